"""What crosses the cut (spec §1): typed payloads between a client and the main server, and their checks.

Per local iteration client k sends :class:`CutActivations` (its cut-layer activations, attention
mask and labels: never its token ids) and the main server answers with :class:`CutGradients`
(the gradient of client k's loss with respect to those activations).  Every runtime (the
in-process loop, the Flower simulation, a deployment) hands these payloads, and only these, from
one party to the other, and the receiving side validates them with :func:`check_activations` /
:func:`check_gradients` against the :class:`CutSpec` it expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sflllm.model import IGNORE_INDEX


@dataclass(frozen=True)
class CutSpec:
    """What the main server expects at the cut: activations (b, s, ``hidden_size``) of ``dtype``,
    labels below ``vocab_size``, and (where the runtime knows them) ``batch_size`` rows of ``seq_len``.
    ``act_bits`` is the precision both directions are sent with (:func:`~sflllm.sfl.quantize_cut`)."""

    hidden_size: int
    dtype: torch.dtype
    vocab_size: int
    batch_size: int | None = None
    seq_len: int | None = None
    act_bits: int = 32  # q_act: bits per value on the wire, both directions (sflllm.sfl.precision)


@dataclass(frozen=True)
class CutActivations:
    """Uplink payload of one client and one local iteration.

    ``hidden`` (b, s, d) floating: the client's output at the cut; ``attention_mask`` (b, s) int64 of
    0/1; ``labels`` (b, s) int64, ``-100`` where no loss is taken.
    """

    hidden: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


@dataclass(frozen=True)
class CutGradients:
    """Downlink payload: ``grad`` = d loss_k / d hidden_k, the shape and dtype of the activations sent."""

    grad: Tensor


def _describe(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def check_activations(payload: object, spec: CutSpec, *, sender: str = "client") -> CutActivations:
    """``payload`` if it is a well-formed :class:`CutActivations` for ``spec``; else ValueError naming
    ``sender`` and the bad field.  Checked: type, dtype, shape (and so size) and the label range."""
    if not isinstance(payload, CutActivations):
        raise ValueError(f"{sender}: expected CutActivations at the cut, got {type(payload).__name__}")
    hidden, mask, labels = payload.hidden, payload.attention_mask, payload.labels
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or hidden.dtype != spec.dtype \
            or hidden.shape[0] < 1 or hidden.shape[2] != spec.hidden_size:
        raise ValueError(f"{sender}: CutActivations.hidden has {_describe(hidden)}, "
                         f"expected (b, s, {spec.hidden_size}) {spec.dtype} with b >= 1")
    rows, length = int(hidden.shape[0]), int(hidden.shape[1])
    if spec.batch_size is not None and rows != spec.batch_size:
        raise ValueError(f"{sender}: CutActivations.hidden has {rows} rows, expected batch_size {spec.batch_size}")
    if spec.seq_len is not None and length != spec.seq_len:
        raise ValueError(f"{sender}: CutActivations.hidden has sequence length {length}, expected seq_len {spec.seq_len}")
    for field, t in (("attention_mask", mask), ("labels", labels)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (rows, length) or t.dtype != torch.int64:
            raise ValueError(f"{sender}: CutActivations.{field} has {_describe(t)}, "
                             f"expected {(rows, length)} torch.int64 (the rows and length of hidden)")
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{sender}: CutActivations.attention_mask holds values other than 0 and 1")
    if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= spec.vocab_size))).any()):
        raise ValueError(f"{sender}: CutActivations.labels holds ids outside 0..{spec.vocab_size - 1} "
                         f"(and {IGNORE_INDEX}, no loss)")
    return payload


def check_gradients(payload: object, sent: Tensor, *, sender: str = "main server") -> CutGradients:
    """``payload`` if it is a :class:`CutGradients` whose ``grad`` matches the activations ``sent``
    in shape and dtype; else ValueError naming the field."""
    if not isinstance(payload, CutGradients):
        raise ValueError(f"{sender}: expected CutGradients, got {type(payload).__name__}")
    grad = payload.grad
    if not isinstance(grad, Tensor) or grad.shape != sent.shape or grad.dtype != sent.dtype:
        raise ValueError(f"{sender}: CutGradients.grad has {_describe(grad)}, "
                         f"expected {tuple(sent.shape)} {sent.dtype} (the activations sent)")
    return payload
