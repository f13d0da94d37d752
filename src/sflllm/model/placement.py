"""Where the model runs and in which precision: ``--device`` and ``--dtype`` resolved to torch objects.

``auto`` picks CUDA, then Apple's MPS, then the CPU.  A device that is named but absent is a
ValueError of one line (the caller reports it), never a traceback from deep inside torch.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes of the frozen base weights (LoRA tensors and their AdamW state stay float32)."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` -> that device if present.

    Raises ValueError naming the device and what is missing.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CUDA build" if torch.backends.cuda.is_built() else "a CPU-only build"
            raise ValueError(f"{name!r}: no CUDA device is available (torch {torch.__version__}, {built}); "
                             "use cpu or auto")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"{name!r}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0..)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(f"{name!r}: Apple MPS is not available on this machine; use cpu or auto")
        return device
    raise ValueError(f"{name!r}: unsupported device type {device.type!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``float32``, ``bfloat16`` or ``float16``; ValueError listing them otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (every tensor the engine creates follows it)."""
    return next(module.parameters()).device
