"""The memory budget to plan for: --vram / --ram, else the free memory of the GPU that NVML (or the
driver's nvidia-smi) finds, else the available RAM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .shapes import GIB, MIB


@dataclass
class Budget:
    vram: float | None  # bytes; None: no GPU (the model runs on the CPU)
    ram: float | None  # bytes; None: not checked
    source: str = ""

    @property
    def gpu(self) -> bool:
        return self.vram is not None


def gpu_free() -> tuple[float, str] | None:
    """(free bytes, name) of the first GPU, through NVML (the pynvml module of nvidia-ml-py, or,
    where that is not installed, the driver's nvidia-smi); None without one."""
    try:
        import pynvml
    except ImportError:
        return _nvidia_smi_free()
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(h)
            return float(pynvml.nvmlDeviceGetMemoryInfo(h).free), name.decode() if isinstance(name, bytes) else name
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no device
        return None


def _nvidia_smi_free() -> tuple[float, str] | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free,name", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        free, name = out.splitlines()[0].split(",", 1)
        return float(free) * MIB, name.strip()
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):  # no driver, no device
        return None


def ram_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        import psutil
        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def detect_budget(vram_gb: float | None = None, ram_gb: float | None = None) -> Budget:
    """--vram / --ram in GB (GiB); without --vram the free memory of the GPU NVML finds, else the CPU
    with the available RAM."""
    ram = ram_gb * GIB if ram_gb is not None else None
    if vram_gb is not None:
        return Budget(vram_gb * GIB, ram, f"GPU, {vram_gb:g} GB (--vram)")
    found = gpu_free()
    if found is not None:
        return Budget(found[0], ram, f"GPU {found[1]}, {found[0] / GIB:.1f} GB free")
    ram = ram if ram is not None else ram_available()
    return Budget(None, ram, f"CPU, {ram / GIB:.1f} GB RAM{' (--ram)' if ram_gb is not None else ' available'}")
