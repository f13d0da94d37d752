"""What crosses the cut (spec §1): typed payloads between a client and the main server, and their checks.

Per local iteration client k sends :class:`CutActivations` (its cut-layer activations, attention
mask and labels: never its token ids) and the main server answers with :class:`CutGradients`
(the gradient of client k's loss with respect to those activations).  Every runtime (the
in-process loop, the Flower simulation, a deployment) hands these payloads, and only these, from
one party to the other, and the receiving side validates them with :func:`check_activations` /
:func:`check_gradients` against the :class:`CutSpec` it expects.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from sflllm.model import IGNORE_INDEX
from sflllm.sfl.loss_scale import loss_scaling_applies


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
    0/1; ``labels`` (b, s) int64, ``-100`` where no loss is taken.  ``found_inf``: whether the client's
    previous step found inf/nan in its (loss-scaled) gradients and skipped; always False unless the
    cut is float16 (:mod:`sflllm.sfl.loss_scale`).
    """

    hidden: Tensor
    attention_mask: Tensor
    labels: Tensor
    found_inf: bool = False

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def to_tensors(self) -> dict[str, Tensor]:
        """The payload as named tensors (:data:`ACTIVATION_FIELDS`; ``found_inf`` as one uint8), for a wire format."""
        return {"hidden": self.hidden, "attention_mask": self.attention_mask, "labels": self.labels,
                "found_inf": torch.tensor([int(self.found_inf)], dtype=torch.uint8)}

    @staticmethod
    def from_tensors(tensors: Mapping[str, Tensor], what: str) -> CutActivations:
        """The payload of :meth:`to_tensors`' tensors; ValueError naming ``what`` and the field when
        the fields are not exactly those or ``found_inf`` is not one uint8 0 or 1."""
        _check_fields(tensors, ACTIVATION_FIELDS, what)
        flag = tensors["found_inf"]
        if flag.shape != (1,) or flag.dtype != torch.uint8 or int(flag.item()) not in (0, 1):
            raise ValueError(f"{what}.found_inf has {_describe(flag)}, expected one torch.uint8 0 or 1")
        return CutActivations(tensors["hidden"], tensors["attention_mask"], tensors["labels"], bool(flag.item()))


@dataclass(frozen=True)
class CutGradients:
    """Downlink payload: ``grad`` = d (S * loss_k) / d hidden_k, the shape and dtype of the activations
    sent, with ``loss_scale`` = S, the main server's loss scale (1.0 unless the cut is float16,
    :mod:`sflllm.sfl.loss_scale`), which the client divides its own gradients by."""

    grad: Tensor
    loss_scale: float = 1.0

    def to_tensors(self) -> dict[str, Tensor]:
        """The payload as named tensors (:data:`GRADIENT_FIELDS`; ``loss_scale`` as one float64)."""
        return {"grad": self.grad, "loss_scale": torch.tensor([self.loss_scale], dtype=torch.float64)}

    @staticmethod
    def from_tensors(tensors: Mapping[str, Tensor], what: str) -> CutGradients:
        """The payload of :meth:`to_tensors`' tensors; ValueError naming ``what`` and the field when
        the fields are not exactly those or ``loss_scale`` is not one float64."""
        _check_fields(tensors, GRADIENT_FIELDS, what)
        scale = tensors["loss_scale"]
        if scale.shape != (1,) or scale.dtype != torch.float64:
            raise ValueError(f"{what}.loss_scale has {_describe(scale)}, expected one torch.float64")
        return CutGradients(tensors["grad"], float(scale.item()))


ACTIVATION_FIELDS = ("attention_mask", "found_inf", "hidden", "labels")
"""The named tensors of a :class:`CutActivations` on the wire."""
GRADIENT_FIELDS = ("grad", "loss_scale")
"""The named tensors of a :class:`CutGradients` on the wire."""


def _check_fields(tensors: Mapping[str, Tensor], fields: tuple[str, ...], what: str) -> None:
    if sorted(tensors) != sorted(fields):
        raise ValueError(f"{what}: fields {sorted(tensors)}, expected {sorted(fields)}")


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
    if not isinstance(payload.found_inf, bool) or (payload.found_inf and not loss_scaling_applies(spec.dtype)):
        raise ValueError(f"{sender}: CutActivations.found_inf is {payload.found_inf!r}, expected a bool, "
                         f"False for a {spec.dtype} cut (only float16 trains with a loss scale)")
    return payload


def check_gradients(payload: object, sent: Tensor, *, sender: str = "main server") -> CutGradients:
    """``payload`` if it is a :class:`CutGradients` whose ``grad`` matches the activations ``sent``
    in shape and dtype, with a finite ``loss_scale`` > 0 (1.0 unless ``sent`` is float16); else
    ValueError naming the field."""
    if not isinstance(payload, CutGradients):
        raise ValueError(f"{sender}: expected CutGradients, got {type(payload).__name__}")
    grad = payload.grad
    if not isinstance(grad, Tensor) or grad.shape != sent.shape or grad.dtype != sent.dtype:
        raise ValueError(f"{sender}: CutGradients.grad has {_describe(grad)}, "
                         f"expected {tuple(sent.shape)} {sent.dtype} (the activations sent)")
    scale = payload.loss_scale
    if isinstance(scale, bool) or not isinstance(scale, float) or not (math.isfinite(scale) and scale > 0) \
            or (scale != 1.0 and not loss_scaling_applies(sent.dtype)):
        raise ValueError(f"{sender}: CutGradients.loss_scale is {scale!r}, expected a finite float > 0, "
                         f"1.0 for a {sent.dtype} cut (only float16 trains with a loss scale)")
    return payload
