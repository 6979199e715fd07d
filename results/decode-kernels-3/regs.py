# ad hoc: registers and spills of down's one-token variant, compiled for sm_90 without a GPU (Triton CPU machine).
# usage: regs.py REPO_ROOT BLOCK_H WARPS [KEEP_BITS 0|1] [H_BCAST 0|1]  (KEEP_BITS/H_BCAST only where the kernel has them)
import sys, subprocess, importlib.util, os, tempfile
root = sys.argv[1]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("mrl_x", os.path.join(root, "modeling_routed_llama.py"))
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
fn = m._down_kernel
sig = {"h_ptr": "*fp32", "wd_ptr": "*bf16", "part_ptr": "*fp32", "out_ptr": "*bf16", "cnt_ptr": "*i32",
       **{n: "i32" for n in ("M", "H", "I", "n_col_tiles", "split")}}
extra = [a for a in fn.arg_names if a not in sig and a not in ("H_BCAST","MODE","DOT_FP32","REDUCE","BLOCK_M","BLOCK_H","BLOCK_C","PDL","KEEP_BITS","BLOCK_N")]
for a in extra:
    sig[a] = "*i32" if a.endswith("_ptr") and a != "s_ptr" else ("*fp32" if a == "s_ptr" else "i32")
bh = int(sys.argv[2]); warps = int(sys.argv[3])
consts = dict(MODE=0, DOT_FP32=False, REDUCE=2, BLOCK_M=1, BLOCK_H=bh, BLOCK_C=128)
if "PDL" in fn.arg_names: consts["PDL"] = False
if "KEEP_BITS" in fn.arg_names: consts["KEEP_BITS"] = sys.argv[4] == "1"; consts["BLOCK_N"] = 32
if "H_BCAST" in fn.arg_names: consts["H_BCAST"] = sys.argv[5] == "1"
full = {**sig, **{k: "constexpr" for k in consts}}
src = ASTSource(fn=fn, signature=full, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
d = tempfile.mkdtemp(); c = os.path.join(d, "k.cubin"); open(c, "wb").write(k.asm["cubin"])
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", c], capture_output=True, text=True).stdout
print(root, consts, "warps", warps, [l.strip() for l in res.splitlines() if "REG" in l])
sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", c], capture_output=True, text=True).stdout
print("  SASS lines", len(sass.splitlines()), "LDG", sass.count("LDG"), "BAR", sass.count("BAR"), "SHFL", sass.count("SHFL"), "STS", sass.count("STS"), "LDS", sass.count("LDS"), "STL", sass.count("STL"), "LDL", sass.count("LDL"))
