# First call: stage the first model chunk, check the Triton kernels, run the decode benchmark (random weights).
source scripts/gpu/env.sh
stage
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)"
python3 benchmarks/check_gpu.py 2>&1 | tee $R/check_gpu.txt
timeout 420 python3 benchmarks/decode.py --shapes tinyllama llama7b --tune --out $R/decode 2>&1 | tee $R/decode_log.txt
pack
