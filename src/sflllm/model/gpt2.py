"""GPT-2 family adapter: mirrors ``transformers`` 5.x ``GPT2Model.forward`` piece by piece.

GPT-2 adds learned position embeddings once, on the client (positions ``0..S-1``, exactly like the
unsplit model, which ignores padding when building position ids); the main server only rebuilds the
causal/padding mask from the 2-D attention mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.masking_utils import create_causal_mask

from sflllm.model.parts import FamilyParts


def _position_ids(hidden: torch.Tensor) -> torch.Tensor:
    """Positions ``0..S-1`` broadcast over the batch, as ``GPT2Model.forward`` builds them without a cache."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


class GPT2Embed(nn.Module):
    """Token + learned position embeddings, then embedding dropout (``wte``, ``wpe``, ``drop``)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module) -> None:
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs_embeds = self.wte(input_ids)
        return self.drop(inputs_embeds + self.wpe(_position_ids(inputs_embeds)))


class GPT2Context(nn.Module):
    """Per-block keyword arguments of a GPT-2 block: the causal+padding mask and the position ids."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config  # a plain attribute (PretrainedConfig is not a module)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers: range
    ) -> list[dict[str, Any]]:
        position_ids = _position_ids(hidden)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=None,
            position_ids=position_ids,
        )
        kwargs = {"attention_mask": mask, "position_ids": position_ids, "use_cache": False}
        return [kwargs for _ in layers]


def gpt2_parts(model: GPT2LMHeadModel) -> FamilyParts:
    """The pieces of a ``GPT2LMHeadModel`` (shared, not copied)."""
    transformer = model.transformer
    return FamilyParts(
        embed=GPT2Embed(transformer.wte, transformer.wpe, transformer.drop),
        context=GPT2Context(model.config),
        blocks=transformer.h,
        norm=transformer.ln_f,
        lm_head=model.lm_head,
    )
