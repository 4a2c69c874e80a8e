"""Where and how an engine runs: its device, checked before anything loads, and its kernels."""

from __future__ import annotations

import torch

from moeserve.config import ConfigError

KERNELS = ("auto", "triton", "torch")


def resolve_device(device: str | None) -> torch.device:
    """The engine's device, with a CUDA index: `None` is CUDA when available, else the CPU;
    CUDA without an index is the current device (cuda:0 unless set). Raises ConfigError for
    a name torch does not know, CUDA that this machine or torch build lacks, or an index
    beyond the visible devices."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from e
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "none is visible"
        raise ConfigError(f"device {device!r}: no CUDA device ({why}); use --device cpu")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ConfigError(
            f"device {device!r}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def resolve_kernels(choice: str, device: torch.device) -> str:
    """The kernels for this device, "triton" or "torch"; "triton" without CUDA only under the
    interpreter."""
    from moeserve.kernels import interpreting, triton_available

    if choice not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {choice!r}")
    if choice == "torch":
        return "torch"
    runnable = triton_available() and (device.type == "cuda" or interpreting())
    if choice == "triton" and not runnable:
        raise ConfigError(
            "kernels=triton needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 for the slow CPU interpreter)"
        )
    if choice == "auto":
        return "triton" if runnable and device.type == "cuda" else "torch"
    return "triton"
