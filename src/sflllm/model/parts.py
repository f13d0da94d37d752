"""Family-independent halves of a split causal LM (spec §1).

A family adapter (see :mod:`sflllm.model.families`) exposes the pieces of an unsplit Hugging Face
causal LM as :class:`FamilyParts`; :class:`ClientPart` and :class:`ServerPart` are thin
``nn.Module`` views over those pieces (no weight copies), so their parameter names are relative
to the part and they share every tensor with the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class FamilyParts:
    """The pieces of one unsplit causal LM, in forward order (all shared with the model).

    ``context(hidden, attention_mask, layers)`` gives what every decoder block needs besides the
    hidden states (masks, position ids, rotary tables): one keyword-argument dict per absolute block
    index in ``layers``, from ``hidden`` (B, S, d) and the 2-D padding mask (B, S). Both parts rebuild
    it from the mask alone, exactly as the unsplit model's forward does, so only the hidden states
    (and the mask) cross the cut.
    """

    embed: nn.Module  # input_ids (B, S) -> hidden (B, S, d), position embeddings included
    context: nn.Module
    blocks: nn.ModuleList  # the L decoder blocks
    norm: nn.Module  # final norm
    lm_head: nn.Module  # hidden -> logits (B, S, V)


def _run_blocks(
    blocks: Sequence[nn.Module], block_kwargs: list[dict[str, Any]], hidden: torch.Tensor
) -> torch.Tensor:
    for block, kwargs in zip(blocks, block_kwargs, strict=True):
        hidden = block(hidden, **kwargs)
    return hidden


class ClientPart(nn.Module):
    """Client side of the cut: token (+ position) embeddings and blocks 1..split_layer.

    ``forward(input_ids, attention_mask) -> hidden`` (B, S, d): the cut-layer activations.
    """

    def __init__(self, parts: FamilyParts, split_layer: int) -> None:
        super().__init__()
        self.embed = parts.embed
        self.context = parts.context
        self.blocks = nn.ModuleList(parts.blocks[:split_layer])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        layers = range(0, len(self.blocks))
        return _run_blocks(self.blocks, self.context(hidden, attention_mask, layers), hidden)


class ServerPart(nn.Module):
    """Main-server side of the cut: blocks split_layer+1..L, final norm and LM head.

    ``forward(hidden, attention_mask) -> logits`` (B, S, V). Masks, position ids and rotary tables
    are recomputed here from ``attention_mask``; nothing else crosses the cut.
    """

    def __init__(self, parts: FamilyParts, split_layer: int) -> None:
        super().__init__()
        self.split_layer = split_layer
        self.context = parts.context
        self.blocks = nn.ModuleList(parts.blocks[split_layer:])
        self.norm = parts.norm
        self.lm_head = parts.lm_head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        layers = range(self.split_layer, self.split_layer + len(self.blocks))
        hidden = _run_blocks(self.blocks, self.context(hidden, attention_mask, layers), hidden)
        return self.lm_head(self.norm(hidden))
