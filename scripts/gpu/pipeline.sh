# Started in the background by the second call (setsid), so it outlives one call; later calls wait for DONE.
# Phases: export the stand-in, convert two routed arms once, solo timing runs, the two RTE comparisons, analysis.
source scripts/gpu/env.sh
set -x
DATA=$PWD/.gpu/glue
date -u
[ -d $STANDIN_HF ] || python3 scripts/gpu/export_dense.py $GGUF $STANDIN_HF
mkdir -p /root/ck
[ -f /root/ck/last8/conversion.json ] || python3 convert.py $STANDIN_HF /root/ck/last8 --layers 22-29 --num-experts 32 --top-k 16 --no-progress
[ -f /root/ck/all/conversion.json ] || python3 convert.py $STANDIN_HF /root/ck/all --layers all --num-experts 32 --top-k 16 --no-progress
cp /root/ck/last8/conversion.json $R/conversion-last8.json; cp /root/ck/all/conversion.json $R/conversion-all.json
COMMON="--task rte --data-dir $DATA --seeds 0 1 2 3 4 --arm name=routed-last8,checkpoint=/root/ck/last8 --arm name=routed-all,checkpoint=/root/ck/all --jobs ${JOBS:-8}"
# solo timing runs (one process on the GPU): the speed figures
mkdir -p $R/timing
python3 -m finetune run --model $STANDIN_HF --task rte --data-dir $DATA --lr 5e-4 --seed 0 > $R/timing/baseline.txt 2>&1
python3 -m finetune run --routed /root/ck/last8 --arm routed-last8 --task rte --data-dir $DATA --lr 5e-4 --seed 0 > $R/timing/routed-last8.txt 2>&1
python3 -m finetune run --routed /root/ck/all --arm routed-all --task rte --data-dir $DATA --lr 5e-4 --seed 0 > $R/timing/routed-all.txt 2>&1
tail -n 2 $R/timing/*.txt
python3 -m finetune compare --model $STANDIN_HF --lr 5e-4 $COMMON --output $R/rte-standin-lr5e-4 \
  --command "python -m finetune compare --model stand-in --task rte --lr 5e-4 --seeds 0 1 2 3 4 --arm name=routed-last8,layers=22-29 --arm name=routed-all,layers=all --jobs ${JOBS:-8}"
python3 -m finetune compare --model $STANDIN_HF --lr 2e-5 $COMMON --output $R/rte-standin-lr2e-5 \
  --command "python -m finetune compare --model stand-in --task rte --lr 2e-5 --seeds 0 1 2 3 4 --arm name=routed-last8,layers=22-29 --arm name=routed-all,layers=all --jobs ${JOBS:-8}"
# compiled timing (Trainer torch_compile), solo
python3 -m finetune run --model $STANDIN_HF --task rte --data-dir $DATA --lr 5e-4 --seed 0 --compile > $R/timing/baseline-compile.txt 2>&1
python3 -m finetune run --routed /root/ck/last8 --arm routed-last8 --task rte --data-dir $DATA --lr 5e-4 --seed 0 --compile > $R/timing/routed-last8-compile.txt 2>&1
tail -n 2 $R/timing/*compile.txt
if [ -f scripts/gpu/after.sh ]; then source scripts/gpu/after.sh; fi
date -u
touch $R/DONE
