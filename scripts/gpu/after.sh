# Sourced at the end of pipeline.sh: the stand-in rows of the decode benchmark, then the routing analysis.
timeout 300 python3 benchmarks/decode.py --shapes --standin $GGUF --out $R/decode-standin 2>&1 | tail -n 30
if [ -f finetune/analyze.py ]; then
  for arm in routed-last8 routed-all; do
    timeout 300 python3 -m finetune.analyze --checkpoint /root/ck/${arm#routed-} \
      --adapter $R/rte-standin-lr5e-4/runs/$arm-seed0/adapter --tasks rte sst2 cola --data-dir $PWD/.gpu/glue \
      --max-examples 200 --out $R/routing-$arm-finetuned 2>&1 | tail -n 20
  done
fi
