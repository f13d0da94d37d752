"""Divergence: non-finite losses, adapters, gradients or AdamW states, and rounds that change nothing.

A learning rate that is too high (``--lr 1e10``) turns the loss into NaN within an iteration; a huge
LoRA scaling (``--lora-alpha 1e30``) overflows AdamW's second moment to inf, after which every
update is exactly 0 and the run "succeeds" with an untrained model. Gradients are not kept after a
step, but AdamW folds each one into its moments, so a non-finite gradient shows up as a non-finite
moment: checking the federation's state (adapters and moments) after every local iteration catches
all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """None when every floating-point tensor is finite, else a short description of the bad ones."""
    bad = non_finite(tensors)
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"{bad[0]}{more} not finite"


def unchanged(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> bool:
    """True when every tensor of ``after`` equals its namesake in ``before`` up to rounding (relative
    1e-6: FedAvg's weighted sum of K equal adapters can move the last bit)."""
    return all(torch.allclose(before[name], t, rtol=1e-6, atol=1e-30) for name, t in after.items())


def diverged_message(round_number: int, where: str, what: str, out: Path, lr: float) -> str:
    """The one-line error of a diverged run: where, what, the checkpoint kept, and the fix."""
    kept = f"round {round_number - 1}'s checkpoint" if round_number > 1 else "no checkpoint yet (it restarts)"
    return (f"training diverged in round {round_number}, {where}: {what}; {out} keeps {kept}; "
            f"continue with a lower learning rate: sflllm train --resume {out} --lr {lr / 10:.3g} "
            "(or start afresh with a smaller --lora-alpha)")
