"""routed-llama's shared library: partition maths, model surgery, source loading, checkpoint I/O and CLI helpers.

`convert.py` (the converter CLI) and `finetune/` (the experiment kit) import these modules by their public names.
The two remote-code files (`configuration_routed_llama.py`, `modeling_routed_llama.py`) ship inside every checkpoint
and import nothing from here.
"""

__version__ = "0.1.0"
