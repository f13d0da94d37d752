"""Atomic files and safetensors checkpoints of a training run. Nothing here unpickles anything.

Every file is written with :func:`sflllm.files.write_atomic` (temporary file in the destination
directory, fsync, ``os.replace``), so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from sflllm.experiments.config import TrainInputError
from sflllm.files import write_atomic


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8"))


_DIGEST_KEY = "sflllm_tensors_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors`` (safetensors has no checksum of its own)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save ``tensors`` (detached, contiguous, on CPU) with string ``metadata`` and a digest, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_atomic(path, safetensors_save(flat, metadata={**metadata, _DIGEST_KEY: tensors_digest(flat)}))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by ``write_safetensors_atomic``.

    Raises TrainInputError naming the file if it is unreadable, truncated, or its bytes do not match
    the digest stored at write time (garbled data).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TrainInputError(f"checkpoint {path}: {e.strerror or e}") from None
    try:
        tensors = safetensors_load(raw)
        # safetensors.torch.load drops the metadata; it is the JSON header's "__metadata__" entry.
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise TrainInputError(f"checkpoint {path} is corrupted (not a readable safetensors file): {e}") from None
    if metadata.pop(_DIGEST_KEY, None) != tensors_digest(tensors):
        raise TrainInputError(f"checkpoint {path} is corrupted: its tensors do not match the stored checksum")
    return tensors, metadata


def check_same_tensors(path: Path, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise TrainInputError naming ``path`` unless ``got`` has exactly the names, shapes, dtypes of ``expected``."""
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    if missing or unexpected:
        raise TrainInputError(
            f"checkpoint {path} does not match this run: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, ref in expected.items():
        t = got[name]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise TrainInputError(
                f"checkpoint {path} does not match this run: {name} is {t.dtype}{list(t.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
