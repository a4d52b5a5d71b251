"""Which device a model runs on: the one place a requested device is checked against what this machine has.

A device that is not there (`cuda` on a machine without CUDA or with a CPU-only torch, `cuda:3` where one GPU
is visible, a device type fastsolar does not run on) is refused before anything is read or allocated, in one
line that names the device and what is available, instead of failing later inside torch.
"""
from __future__ import annotations

import torch

RUNS_ON = ("cpu", "cuda")


class DeviceUnavailableError(ValueError):
    """The requested device is not on this machine (a ValueError: the CLI answers it with exit status 2)."""


def available_devices() -> list[str]:
    """The devices a model can run on here, e.g. ["cpu", "cuda:0", "cuda:1"]."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def resolve_device(device: str | torch.device | int | None) -> torch.device:
    """`device` as a concrete torch.device that exists here (an int is a CUDA index; None or "auto": CUDA when
    there is one, else the CPU); a bare "cuda" becomes the current CUDA device."""
    if device is None or device == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool):
        raise ValueError(f"device={device!r} is not a device")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if dev.type not in RUNS_ON:
        raise DeviceUnavailableError(f"device {str(dev)!r}: fastsolar runs on {' or '.join(RUNS_ON)}; available here: "
                                     f"{', '.join(available_devices())}")
    if dev.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceUnavailableError(f"device {str(dev)!r} is not available: {_why_no_cuda()}; available here: cpu")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= count:
        raise DeviceUnavailableError(f"device {str(dev)!r} is not available: {count} CUDA device(s) visible; "
                                     f"available here: {', '.join(available_devices())}")
    return dev
