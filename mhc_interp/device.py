"""Which device a run may use: one check, shared by the command line and the benchmarks."""

from __future__ import annotations

from typing import Optional

import torch


class DeviceError(ValueError):
    """A device name this machine cannot run on."""


def resolve_device(name: str) -> torch.device:
    """`name` as a torch.device, or a DeviceError saying why it cannot be used here (unknown name,
    no CUDA GPU, a CUDA index past the last GPU, a backend this torch lacks)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} is not available: this torch ({torch.__version__}) sees "
                "no CUDA GPU; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} is not available: there are {torch.cuda.device_count()} "
                f"CUDA device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None)
        if backend is None or not backend.is_available():
            raise DeviceError(f"device {name!r} is not available on this machine")
    return device


def available_memory_bytes() -> Optional[int]:
    """Memory the OS can give this process now (Linux `MemAvailable`), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
