# Wait (up to $1 seconds) for the background pipeline, showing its log; pack what exists.
source scripts/gpu/env.sh
limit=${1:-540}
for ((i = 0; i < limit; i += 10)); do
  [ -f $R/DONE ] && break
  sleep 10
done
tail -n 60 $R/pipeline.log
[ -f $R/DONE ] && echo PIPELINE DONE || echo PIPELINE STILL RUNNING
pack
