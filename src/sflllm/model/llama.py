"""Llama-like family adapters (Llama, Mistral, Qwen2): mirrors ``LlamaModel.forward`` in
``transformers`` 5.x, whose structure these families share (``model.model.embed_tokens``,
``.layers``, ``.norm``, ``.rotary_emb``, ``lm_head``).

There are no position embeddings on the client; each part recomputes position ids ``0..S-1`` (as
the unsplit model does without a cache), the rotary tables and the mask of each block's attention
kind from the 2-D attention mask. The families differ only in which attention kind each block uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from sflllm.model.parts import FamilyParts

_MASK_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def llama_layer_types(config: Any) -> list[str]:
    """``LlamaModel``: every block uses the full causal mask."""
    return ["full_attention"] * config.num_hidden_layers


def mistral_layer_types(config: Any) -> list[str]:
    """``MistralModel``: a sliding-window mask on every block when ``config.sliding_window`` is set."""
    kind = "full_attention" if config.sliding_window is None else "sliding_attention"
    return [kind] * config.num_hidden_layers


def qwen2_layer_types(config: Any) -> list[str]:
    """``Qwen2Model``: the per-block kinds listed in ``config.layer_types``."""
    return list(config.layer_types)


class LlamaContext(nn.Module):
    """Per-block keyword arguments of a Llama-like decoder layer: mask, rotary tables, position ids."""

    def __init__(self, config: Any, rotary_emb: nn.Module, layer_types: Sequence[str]) -> None:
        super().__init__()
        self.config = config  # a plain attribute (PretrainedConfig is not a module)
        self.rotary_emb = rotary_emb
        self.layer_types = list(layer_types)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers: range
    ) -> list[dict[str, Any]]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kinds = [self.layer_types[i] for i in layers]
        masks = {
            kind: _MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
            )
            for kind in set(kinds)
        }
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        return [
            {
                "attention_mask": masks[kind],
                "position_embeddings": position_embeddings,
                "position_ids": position_ids,
                "use_cache": False,
            }
            for kind in kinds
        ]


def llama_like_parts(layer_types: Callable[[Any], list[str]]) -> Callable[[PreTrainedModel], FamilyParts]:
    """A ``parts`` function for a Llama-like ``*ForCausalLM`` whose blocks use ``layer_types(config)``."""

    def parts(model: PreTrainedModel) -> FamilyParts:
        backbone = model.model
        return FamilyParts(
            embed=backbone.embed_tokens,
            context=LlamaContext(model.config, backbone.rotary_emb, layer_types(model.config)),
            blocks=backbone.layers,
            norm=backbone.norm,
            lm_head=model.lm_head,
        )

    return parts
