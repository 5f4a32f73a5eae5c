"""Benchmark and device-check scripts: the numbers in the documentation, and the GPU check.

Not part of the installed package (the wheel ships only ``kernrnn``); they run
from a source checkout, from the repository root, as modules::

    python -m benchmarks.zoo --help
    python -m benchmarks.devicecheck --list     # or: bash scripts/gpu-check.sh --list

``kernrnn bench`` itself (the CPU comparison with PyTorch) is part of the
package: :mod:`kernrnn.bench.cpu`.  See ``benchmarks/README.md``.
"""

import os

# Timed calls run the compiled kernels, never the NumPy first tier (benchmarks.startup
# sets KERNRNN_TIERS itself for the processes it times).
os.environ.setdefault("KERNRNN_TIERS", "0")

__all__ = ["torch_fp32_precision"]


def torch_fp32_precision(torch, precision: str = "ieee") -> str:
    """Make PyTorch's cuDNN RNNs and cuBLAS matmuls compute float32 as ``"ieee"``
    float32 (or ``"tf32"``); returns what PyTorch reports afterwards.

    kernrnn computes float32 in float32, so a like-for-like comparison needs
    cuDNN to do the same; its default for RNNs is TF32 tensor cores (10-bit
    mantissas).  PyTorch >= 2.9 has per-backend ``fp32_precision`` settings
    and deprecates ``allow_tf32`` (mixing the two raises on reading); older
    versions only have ``allow_tf32``.
    """
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        torch.backends.cudnn.rnn.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
        return (f"cudnn.rnn={torch.backends.cudnn.rnn.fp32_precision}, "
                f"cuda.matmul={torch.backends.cuda.matmul.fp32_precision}")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return (f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
