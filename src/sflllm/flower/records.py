"""Tensors and cut payloads as Flower records (ArrayRecord), and back, validated on arrival.

A tensor travels as a Flower ``Array`` holding its raw little-endian bytes (``stype`` :data:`RAW`),
its torch dtype name and its shape; nothing is pickled.  The receiving side checks the dtype
against an allow-list and that the byte count equals ``prod(shape) * itemsize`` before it builds a
tensor, then the protocol checks (:func:`sflllm.sfl.check_activations`, ``check_gradients``) judge
the payload's shapes and values.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import Tensor

from sflllm.sfl import CutActivations, CutGradients

RAW = "sflllm.raw"  # Array.stype of the bytes written by tensors_to_record
DTYPES = {str(d).removeprefix("torch."): d for d in
          (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8)}
CUT = "cut"  # the RecordDict key of a CutActivations payload
GRAD = "grad"  # the RecordDict key of a CutGradients payload
STATE = "state"  # a client's whole state (sflllm.sfl.federation.client_state names)
ADAPTER = "adapter"  # a client adapter's LoRA tensors
META = "meta"  # a MetricRecord of small numbers (client index, D_k)

if sys.byteorder != "little":  # pragma: no cover - torch's supported platforms are little-endian
    raise ImportError("sflllm.flower's wire format is little-endian")


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord of ``tensors`` (any allowed dtype, bfloat16 included), as raw bytes."""
    arrays = {}
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which does not travel (allowed: {sorted(DTYPES)})")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        arrays[name] = Array(dtype=dtype, shape=tuple(int(n) for n in t.shape), stype=RAW, data=data)
    return ArrayRecord(arrays)


def record_to_tensors(record: object, what: str) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord written by :func:`tensors_to_record`; ValueError naming ``what``
    and the array on a wrong record type, serialisation, dtype or byte count."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    tensors = {}
    for name, array in record.items():
        if array.stype != RAW or array.dtype not in DTYPES:
            raise ValueError(f"{what}.{name}: unsupported array (stype {array.stype!r}, dtype {array.dtype!r}); "
                             f"expected stype {RAW!r} and a dtype in {sorted(DTYPES)}")
        dtype = DTYPES[array.dtype]
        shape = tuple(array.shape)
        if any(not isinstance(n, int) or n < 0 for n in shape):
            raise ValueError(f"{what}.{name}: invalid shape {shape}")
        expected = math.prod(shape) * dtype.itemsize
        if len(array.data) != expected:
            raise ValueError(f"{what}.{name}: {len(array.data)} bytes for shape {shape} {array.dtype}, "
                             f"expected {expected}")
        tensors[name] = torch.frombuffer(bytearray(array.data), dtype=torch.uint8).view(dtype).reshape(shape) \
            if expected else torch.empty(shape, dtype=dtype)
    return tensors


def _record(content: RecordDict, key: str, what: str) -> dict[str, Tensor]:
    if key not in content:
        raise ValueError(f"{what}: message carries no {key!r} record")
    return record_to_tensors(content[key], what)


def activations_to_records(cut: CutActivations) -> RecordDict:
    return RecordDict({CUT: tensors_to_record(cut.to_tensors())})


def records_to_activations(content: RecordDict, sender: str) -> CutActivations:
    """The CutActivations in a message from ``sender`` (decoded and size-checked, not yet judged
    against the cut spec: :func:`sflllm.sfl.main_server_step` does that)."""
    what = f"{sender}: CutActivations"
    return CutActivations.from_tensors(_record(content, CUT, what), what)


def gradients_to_records(grads: CutGradients) -> RecordDict:
    return RecordDict({GRAD: tensors_to_record(grads.to_tensors())})


def records_to_gradients(content: RecordDict, sender: str = "main server") -> CutGradients:
    what = f"{sender}: CutGradients"
    return CutGradients.from_tensors(_record(content, GRAD, what), what)


def error_line(reason: str) -> str:
    """The client's own error message out of the reason Flower reports (with Ray: a whole traceback
    ending in ``... Message: <the exception's message>'>``)."""
    tail = str(reason).rsplit("Message: ", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1].removesuffix("'>").strip() if lines else str(reason)
