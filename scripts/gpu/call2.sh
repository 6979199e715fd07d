# Second call: stage the second chunk (the model is complete), start the pipeline in its own session, wait.
source scripts/gpu/env.sh
stage
[ -f $GGUF ] || { echo "model not assembled"; exit 1; }
rm -f $R/DONE
setsid nohup bash scripts/gpu/pipeline.sh > $R/pipeline.log 2>&1 < /dev/null &
sleep 5
bash scripts/gpu/wait.sh ${1:-540}
