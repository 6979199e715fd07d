"""One hardware probe for every provenance record."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_name(device: str | None = None) -> str:
    """"<GPU name> x<count>" when CUDA is used (`device` None means: if available), else "CPU <name>, <n> cores"."""
    import torch

    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores"


def hardware(device: str = "cpu") -> dict:
    """Where a measurement ran: device, GPU and CPU names, core and thread counts, platform and library versions."""
    import torch
    import transformers

    return {
        "name": hardware_name(device),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None,
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def compile_problem(device: str | None = None) -> str | None:
    """Why `torch.compile` (inductor) cannot compile here, or None: on a CUDA device it generates Triton kernels
    (Triton must import), on the CPU C++ (a compiler must be on PATH). `device` None: CUDA if available."""
    import torch

    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "no compiler backend: inductor needs Triton on a GPU, and it does not import"
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # an inductor without this function: look on PATH as it would
        found = shutil.which("g++") or shutil.which("clang++")
        return None if found else "no compiler backend: inductor needs a C++ compiler on the CPU (g++ or clang++)"
    try:  # inductor's own search ($CXX, then g++/clang++ and the like), so that the check agrees with it
        get_cpp_compiler()
    except Exception as exc:  # InvalidCxxCompiler: inductor would fail the same way
        return f"no compiler backend: inductor needs a C++ compiler on the CPU ({type(exc).__name__})"
    return None
