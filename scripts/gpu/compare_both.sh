# Both RTE comparisons at once (15 runs each, all in one round: the runs are CPU-bound, the GPU has room),
# then the routing analysis of the fine-tuned seed-0 adapters. Results under /root/res (not $OUT, which each
# call empties). Started in the background (setsid) by a call; later calls wait with wait.sh-style loops.
source scripts/gpu/env.sh
R=/root/res; mkdir -p $R
DATA=$PWD/.gpu/glue
ARMS="--arm name=routed-last8,checkpoint=/root/ck/last8 --arm name=routed-all,checkpoint=/root/ck/all"
SHOWN="--arm name=routed-last8,layers=22-29 --arm name=routed-all,layers=all --jobs 15"
for lr in 5e-4 2e-5; do
  python3 -m finetune compare --model $STANDIN_HF --task rte --data-dir $DATA --lr $lr --seeds 0 1 2 3 4 $ARMS \
    --jobs 15 --output $R/rte-standin-lr$lr --overwrite \
    --command "python -m finetune compare --model stand-in --task rte --lr $lr --seeds 0 1 2 3 4 $SHOWN" > $R/compare-lr$lr.log 2>&1 &
done
wait
for arm in last8 all; do
  timeout 150 python3 -m finetune.analyze --checkpoint /root/ck/$arm --adapter $R/rte-standin-lr5e-4/runs/routed-$arm-seed0/adapter \
    --tasks rte sst2 cola --data-dir $DATA --max-examples 200 --device cuda --out $R/routing-standin-$arm-finetuned > $R/analyze-$arm.log 2>&1
done
touch $R/DONE
