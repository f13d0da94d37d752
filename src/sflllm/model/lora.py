"""LoRA adapters through peft (``LoraConfig`` + ``get_peft_model``, task type CAUSAL_LM)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from sflllm.cost.profile import matches_targets
from sflllm.model.families import family


def attach_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str] | None = None,
    *,
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` with rank-``rank`` LoRA adapters on ``targets`` and freeze the base weights.

    ``targets`` defaults to the family's :func:`~sflllm.model.families.default_lora_targets` and is
    matched like peft does (a module whose qualified name ends with the target). LoRA ``A`` is
    initialised from ``seed`` (the global RNG is left untouched); LoRA ``B`` starts at zero, so the
    wrapped model computes exactly what ``model`` did. peft injects the adapters into ``model`` in
    place.
    """
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    fam = family(model.config.model_type)
    if targets is None:
        targets = fam.lora_targets
    elif isinstance(targets, str):  # one module name, not a sequence of characters
        targets = [targets]
    if not targets:
        raise ValueError("targets must name at least one module (None means the family default)")
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        fan_in_fan_out=fam.fan_in_fan_out,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def smallest_target_dimension(model: nn.Module, targets: Sequence[str] | None = None) -> tuple[str, int]:
    """(name, size) of the smallest input or output dimension over the modules LoRA would wrap.

    A rank above it cannot add anything (the LoRA update ``B A`` has at most that rank) and only
    costs memory. ``targets`` as in :func:`attach_lora`; raises ValueError when none matches.
    """
    if targets is None:
        targets = family(model.config.model_type).lora_targets
    elif isinstance(targets, str):
        targets = [targets]
    sizes = [
        (name, min(module.weight.shape))
        for name, module in model.named_modules()
        if matches_targets(name, list(targets)) and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    ]
    if not sizes:
        raise ValueError(f"lora_targets {list(targets)} match no weight matrix of the model")
    return min(sizes, key=lambda item: item[1])


def lora_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters under ``module`` by name relative to it (peft's ``lora_`` naming).

    The names are those ``torch.func.functional_call(module, tensors, args)`` expects, so per-client
    adapter tensors can be swapped in without touching the shared frozen base.
    """
    return {name: param for name, param in module.named_parameters() if "lora_" in name}
