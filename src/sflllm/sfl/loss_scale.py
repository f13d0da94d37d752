"""Dynamic loss scaling for float16 base weights: ``torch.amp.GradScaler``'s semantics across the parties.

float16 keeps 5 exponent bits, so the small gradients of a float16 backward underflow to zero (and
large ones overflow).  GradScaler's remedy: back-propagate ``S * loss``, divide every optimizer's
gradients by ``S`` before its step, and adapt ``S``.  Its semantics with several optimizers, which
SFL has (one per party: each client adapter, the server adapter(s)), are:

1. every optimizer's gradients are unscaled and checked for inf/nan (``GradScaler.unscale_``); an
   optimizer whose own gradients are not finite skips its step, the others step (``GradScaler.step``);
2. after every optimizer of the iteration has stepped or skipped, ``S`` is updated once
   (``GradScaler.update``): ``S * backoff_factor`` if ANY optimizer found inf/nan (and the count of
   finite iterations restarts), else the count grows, and ``S * growth_factor`` once it reaches
   ``growth_interval`` (the count restarts).

One process holds all of GradScaler's state; in SFL the parties are apart.  So (spec §1):

* the **main server** owns ``S`` (:class:`LossScaler`).  In iteration t it scales its loss by
  ``S_t`` (:func:`scale_loss`), steps or skips its own adapter(s) (:meth:`~sflllm.sfl.Adapter.step`),
  and sends every client its activation gradient together with ``loss_scale = S_t``
  (:class:`~sflllm.sfl.CutGradients`);
* **client k** unscales its own LoRA gradients by that ``loss_scale``, steps or skips, and reports
  whether it found inf/nan with its next activations (``CutActivations.found_inf``);
* at the start of iteration t+1, once every client's activations (with their reports of t) have
  arrived and before anything is scaled, the main server applies iteration t's update with
  ``found_inf = its own (the server adapters', as they stepped in t) OR any client's report``
  (:meth:`LossScaler.update`).  That is GradScaler's ``update()`` between iteration t's steps and
  iteration t+1's ``scale(loss)``: the sequence of scales, and so every step, is GradScaler's.
  Across a round boundary (FedAvg) the update waits for the next round's first activations; the
  state (``S``, the count, whether an update is due, each adapter's last ``found_inf``) is in the
  checkpoint, so a resumed run is bit-identical.  A client dropped from a round (the data plane)
  reports with its next activations, if it comes back; the update goes on without it meanwhile.

The constants are GradScaler's defaults (tested against ``torch.amp.GradScaler``); the unscale and
the update run torch's own GradScaler kernels (``torch._amp_foreach_non_finite_check_and_unscale_``,
``torch._amp_update_scale_``).  Scaling applies to float16 only (:func:`loss_scaling_applies`):
float32 and bfloat16 (8 exponent bits, float32's range) train exactly as without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's defaults (tests/test_loss_scale.py compares them)
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


def loss_scaling_applies(dtype: torch.dtype) -> bool:
    """Whether a base in ``dtype`` trains with a dynamic loss scale: float16 only."""
    return dtype == torch.float16


def scale_loss(loss: Tensor, loss_scale: float) -> Tensor:
    """``loss_scale * loss`` (what GradScaler.scale does); ``loss`` itself when the scale is 1."""
    return loss if loss_scale == 1.0 else loss * loss_scale


@torch.no_grad()
def unscale_and_check(grads: Sequence[Tensor], loss_scale: float) -> bool:
    """Divide ``grads`` in place by ``loss_scale`` (GradScaler.unscale_'s kernel, multiplying by the
    float32 reciprocal); True if any of them holds an inf or nan."""
    if not grads:
        return False
    device = grads[0].device
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.tensor([1.0 / loss_scale], dtype=torch.float32, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found_inf, inv_scale)
    return bool(found_inf.item())


@dataclass(frozen=True)
class ScaleState:
    """GradScaler's ``_scale`` and ``_growth_tracker``: the scale S and the finite iterations since it last changed."""

    scale: float = INIT_SCALE
    growth_tracker: int = 0


def updated_scale(state: ScaleState, found_inf: bool, *, growth_factor: float = GROWTH_FACTOR,
                  backoff_factor: float = BACKOFF_FACTOR, growth_interval: int = GROWTH_INTERVAL) -> ScaleState:
    """GradScaler.update's rule (its kernel ``torch._amp_update_scale_``) for one iteration whose
    parties together found inf/nan or not."""
    scale = torch.tensor([state.scale], dtype=torch.float32)
    tracker = torch.tensor([state.growth_tracker], dtype=torch.int32)
    torch._amp_update_scale_(scale, tracker, torch.tensor([float(found_inf)]), growth_factor, backoff_factor,
                             growth_interval)
    return ScaleState(float(scale.item()), int(tracker.item()))


class LossScaler:
    """The main server's dynamic loss scale (see the module docstring for when it changes).

    ``due`` says whether an iteration has been stepped since the last update (none before the first).
    """

    def __init__(self, *, init_scale: float = INIT_SCALE, growth_factor: float = GROWTH_FACTOR,
                 backoff_factor: float = BACKOFF_FACTOR, growth_interval: int = GROWTH_INTERVAL) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not (growth_factor > 1 and 0 < backoff_factor < 1):
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor!r}, "
                             f"{backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        self.state = ScaleState(float(init_scale))
        self.due = False
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    @property
    def scale(self) -> float:
        return self.state.scale

    def update(self, found_inf: Iterable[bool]) -> float:
        """Apply the update due for the last stepped iteration, given every party's ``found_inf`` of it
        (a no-op before the first); returns S for the iteration about to run, which is then due."""
        found = any(found_inf)  # consumed whatever is due, so a caller's generator is always drained
        if self.due:
            self.state = updated_scale(self.state, found, growth_factor=self.growth_factor,
                                       backoff_factor=self.backoff_factor, growth_interval=self.growth_interval)
        self.due = True
        return self.state.scale

    def state_dict(self) -> dict[str, Tensor]:
        """The scale, the growth count and ``due``, as ``loss_scale.*`` tensors (safetensors-safe)."""
        return {
            "loss_scale.scale": torch.tensor([self.state.scale], dtype=torch.float32),
            "loss_scale.growth_tracker": torch.tensor([self.state.growth_tracker], dtype=torch.int64),
            "loss_scale.due": torch.tensor([int(self.due)], dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict` (keys, shapes and dtypes already checked by the caller);
        ValueError naming the key of an impossible value, and nothing changes then."""
        scale = float(state["loss_scale.scale"].item())
        tracker = int(state["loss_scale.growth_tracker"].item())
        due = int(state["loss_scale.due"].item())
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"state key 'loss_scale.scale': {scale!r} is not a finite number > 0")
        if not 0 <= tracker < self.growth_interval:
            raise ValueError(f"state key 'loss_scale.growth_tracker': {tracker} outside 0..{self.growth_interval - 1}")
        if due not in (0, 1):
            raise ValueError(f"state key 'loss_scale.due': {due} is not 0 or 1")
        self.state, self.due = ScaleState(scale, tracker), bool(due)


__all__ = [
    "BACKOFF_FACTOR",
    "GROWTH_FACTOR",
    "GROWTH_INTERVAL",
    "INIT_SCALE",
    "LossScaler",
    "ScaleState",
    "loss_scaling_applies",
    "scale_loss",
    "unscale_and_check",
    "updated_scale",
]
