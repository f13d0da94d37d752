"""Precision of what crosses the cut (spec §2 ``q_act``): activations up, activation gradients down.

``quantize_cut(x, bits)`` returns what the receiving party reconstructs after ``x`` was sent with
``bits`` bits per value, in ``x``'s own dtype (so the cut checks and the model see the usual tensor):

* 32: ``x`` itself (float32 on the wire; bit-identical to no quantisation);
* 16: rounded to bfloat16 (8 exponent bits like float32, so activation gradients do not underflow
  as they would in float16), then back;
* 8: int8 with one scale per token (the last axis): ``scale = max|x| / 127``, ``round(x / scale)``
  clipped to [-127, 127], times ``scale``. The scale itself (one float per token) is not counted in
  the delay model's ``A = G = s d q_act``; it is 1/d of the payload (1.6% at d = 64).

The backward pass is straight-through: the client keeps the graph of its unquantised activations and
back-propagates the (quantised) gradient the main server returns, so the quantiser's own derivative
(zero almost everywhere) never enters.
"""

from __future__ import annotations

import torch
from torch import Tensor

ACT_BITS = (32, 16, 8)
INT8_MAX = 127


def check_act_bits(bits: int) -> int:
    """``bits`` if it is a supported cut precision (32, 16, 8); ValueError otherwise."""
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {', '.join(map(str, ACT_BITS))}, got {bits!r}")
    return bits


@torch.no_grad()
def quantize_cut(x: Tensor, bits: int) -> Tensor:
    """``x`` as reconstructed after crossing the cut with ``bits`` bits per value (detached, same dtype)."""
    if check_act_bits(bits) == 32:
        return x
    if bits == 16:
        return x.detach().to(torch.bfloat16).to(x.dtype)
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero token stays zero
    return (torch.round(x.detach() / scale).clamp_(-INT8_MAX, INT8_MAX) * scale).to(x.dtype)
