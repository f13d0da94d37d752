"""One party's LoRA tensors and their AdamW optimizer, with a flat, safetensors-safe state.

Every party of the protocol (spec §1) that trains owns an :class:`Adapter`: each simulated client
its client adapter, the main server its server adapter(s).  The frozen base model is *not* part
of an adapter; the tensors here are injected into the one shared base with
``torch.func.functional_call``, so a simulated party costs only its LoRA tensors plus two AdamW
moments (and, transiently, their gradients).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sflllm.sfl.loss_scale import unscale_and_check

ADAM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class Adapter:
    """LoRA tensors of one party (leaf tensors, own storage) and an AdamW over them.

    The AdamW state is created eagerly with the same values ``torch.optim.AdamW`` creates lazily at
    its first step (step 0, zero moments), so the set of state tensors never changes and a resumed
    run is bit-identical to an uninterrupted one.

    With ``loss_scaling`` (a float16 base, :mod:`sflllm.sfl.loss_scale`) its gradients are of a scaled
    loss: :meth:`step` unscales them and skips the step when they are not finite, and the adapter
    keeps whether its last step found inf/nan (:attr:`found_inf`, part of its state).
    """

    def __init__(self, initial: Mapping[str, Tensor], *, lr: float, weight_decay: float,
                 loss_scaling: bool = False) -> None:
        self.tensors: dict[str, Tensor] = {
            name: t.detach().clone().requires_grad_(True) for name, t in initial.items()
        }
        self.optimizer = torch.optim.AdamW(list(self.tensors.values()), lr=lr, weight_decay=weight_decay)
        group_state = self.optimizer.state_dict()
        group_state["state"] = {
            index: {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(t),
                "exp_avg_sq": torch.zeros_like(t),
            }
            for index, t in enumerate(self.tensors.values())
        }
        self.optimizer.load_state_dict(group_state)
        device = next(iter(self.tensors.values())).device
        self._found_inf = torch.zeros(1, device=device) if loss_scaling else None

    @property
    def found_inf(self) -> bool:
        """Whether the last :meth:`step` found inf/nan in the gradients and skipped (False without loss scaling)."""
        return self._found_inf is not None and bool(self._found_inf.item())

    def step(self, loss_scale: float = 1.0) -> bool:
        """One AdamW step from the gradients accumulated on the tensors; then drop the gradients.

        With loss scaling the gradients are first divided by ``loss_scale`` (the S they were multiplied
        by) and checked: if any is inf/nan the step is skipped (GradScaler.step).  Returns whether it was.
        """
        if self._found_inf is None:
            if loss_scale != 1.0:
                raise ValueError(f"this adapter trains without loss scaling, got loss_scale {loss_scale!r}")
            found_inf = False
        else:
            grads = [t.grad for t in self.tensors.values() if t.grad is not None]
            found_inf = unscale_and_check(grads, loss_scale)
            self._found_inf.fill_(float(found_inf))
        if not found_inf:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf

    def set_gradients(self, grads: Mapping[str, Tensor]) -> None:
        for name, g in grads.items():
            self.tensors[name].grad = g

    @torch.no_grad()
    def assign(self, values: Mapping[str, Tensor]) -> None:
        """Overwrite the LoRA tensors (e.g. with the FedAvg'd global adapter); optimizer state is kept."""
        for name, t in self.tensors.items():
            t.copy_(values[name])

    def live_state(self, prefix: str) -> dict[str, Tensor]:
        """References (not copies) to every tensor of this party's state, under flat names."""
        state: dict[str, Tensor] = {}
        opt_state = self.optimizer.state
        for name, t in self.tensors.items():
            state[f"{prefix}.lora.{name}"] = t
            for field in ADAM_FIELDS:
                state[f"{prefix}.adamw.{name}.{field}"] = opt_state[t][field]
        if self._found_inf is not None:
            state[f"{prefix}.found_inf"] = self._found_inf
        return state
