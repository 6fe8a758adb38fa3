"""bitsandbytes, imported without fetching code from the model hub.

bitsandbytes (0.50 and newer), on a CPU with AVX-512 BF16, calls
`kernels.get_kernel("kernels-community/quantization-bitsandbytes")` while it imports: it downloads
a compiled kernel from the hub and runs it, for 4-bit matmuls on the CPU. A run loads the weights its
cards name and nothing else, so we refuse that lookup; bitsandbytes then uses its own CPU code (what
it did before, and what it does offline) and logs that the kernel was not loaded, a message we drop.
Every place that may import bitsandbytes (the transformers backend, finetune through peft) calls
`load()` first.
"""
from __future__ import annotations

import logging
import sys


class _DropKernelFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


def _refuse(repo_id, *args, **kwargs):
    raise RuntimeError(f"ensemble-instruct does not fetch code from the hub ({repo_id})")


def load():
    """Import bitsandbytes (once) with the hub kernel lookup refused; returns the module."""
    if sys.modules.get("bitsandbytes") is not None:  # None there: unusable, and the import below says so
        return sys.modules["bitsandbytes"]
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelFallback())
    try:
        import kernels
    except Exception:  # not installed (transformers < 5 does not need it): nothing to refuse
        kernels = None
    real = getattr(kernels, "get_kernel", None)
    if kernels is not None:
        kernels.get_kernel = _refuse
    try:
        import bitsandbytes
    finally:
        if kernels is not None:
            kernels.get_kernel = real
    return bitsandbytes
