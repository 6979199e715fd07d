# Wait (up to $1 s) for compare_both.sh, then pack /root/res (no adapters, no checkpoints) into $OUT.
source scripts/gpu/env.sh
R=/root/res
for ((i = 0; i < ${1:-540}; i += 10)); do [ -f $R/DONE ] && break; sleep 10; done
tail -n 5 $R/*.log
[ -f $R/DONE ] && echo ALL DONE || echo STILL RUNNING
tar -C $R --exclude='adapter' -czf $OUT/results.tar.gz . ; ls -la $OUT
