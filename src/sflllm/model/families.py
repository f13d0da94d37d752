"""Registry of supported causal-LM families, keyed by ``config.model_type``.

Adding a family is one entry here (a function returning its :class:`~sflllm.model.parts.FamilyParts`,
see :mod:`sflllm.model.gpt2`, :mod:`sflllm.model.llama`) plus its ``model_type`` in the cost model's
``MODEL_FAMILIES``, which also holds the spec §2 default LoRA targets both sides use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel

from sflllm.cost.profile import DEFAULT_LORA_TARGETS, MODEL_FAMILIES
from sflllm.model.gpt2 import gpt2_parts
from sflllm.model.llama import llama_layer_types, llama_like_parts, mistral_layer_types, qwen2_layer_types
from sflllm.model.parts import FamilyParts


@dataclass(frozen=True)
class Family:
    """One model family: default LoRA target module names and how to take the model apart."""

    lora_targets: tuple[str, ...]
    parts: Callable[[PreTrainedModel], FamilyParts]
    fan_in_fan_out: bool = False  # True where the block's linears store (in, out) weights (GPT-2 Conv1D)


def _targets(model_type: str) -> tuple[str, ...]:
    """Spec §2 default targets, shared with the cost model (one source of truth, torch-free)."""
    return DEFAULT_LORA_TARGETS[MODEL_FAMILIES[model_type]]


FAMILIES: dict[str, Family] = {
    "gpt2": Family(lora_targets=_targets("gpt2"), parts=gpt2_parts, fan_in_fan_out=True),
    "llama": Family(lora_targets=_targets("llama"), parts=llama_like_parts(llama_layer_types)),
    "mistral": Family(lora_targets=_targets("mistral"), parts=llama_like_parts(mistral_layer_types)),
    "qwen2": Family(lora_targets=_targets("qwen2"), parts=llama_like_parts(qwen2_layer_types)),
}


def family(model_type: str) -> Family:
    """The registered family of ``model_type``; ValueError listing the supported ones otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported families: {', '.join(sorted(FAMILIES))}"
        ) from None


def default_lora_targets(model_type: str) -> list[str]:
    """Default LoRA target modules of a family (GPT-2: ``c_attn``; Llama-like: ``q_proj``, ``v_proj``)."""
    return list(family(model_type).lora_targets)
