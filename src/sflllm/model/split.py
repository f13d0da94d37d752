"""Split a (LoRA-wrapped) causal LM at a cut layer into a client part and a main-server part (spec §1)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from peft import PeftModel
from transformers import PreTrainedModel

from sflllm.model.families import family
from sflllm.model.parts import ClientPart, ServerPart


@dataclass(frozen=True, eq=False)
class SplitModel:
    """A model cut after block ``split_layer``; ``client`` and ``server`` share every tensor with ``full``.

    ``client(input_ids, attention_mask) -> hidden`` (B, S, d) runs the embeddings and blocks
    1..split_layer; ``server(hidden, attention_mask) -> logits`` (B, S, V) runs blocks
    split_layer+1..num_layers, the final norm and the LM head. ``server(client(x, m), m)`` equals
    ``full(input_ids=x, attention_mask=m).logits``.
    """

    full: PeftModel | PreTrainedModel
    client: ClientPart
    server: ServerPart
    split_layer: int
    num_layers: int


def split_model(model: PeftModel | PreTrainedModel, split_layer: int) -> SplitModel:
    """Cut ``model`` after block ``split_layer`` (1..L-1); no weights are copied."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    parts = family(causal_lm.config.model_type).parts(causal_lm)
    num_layers = len(parts.blocks)
    if isinstance(split_layer, bool) or not isinstance(split_layer, Integral) or not 1 <= split_layer < num_layers:
        raise ValueError(
            f"split_layer must be an integer in 1..{num_layers - 1} for a model with {num_layers} blocks, "
            f"got {split_layer!r}"
        )
    return SplitModel(
        full=model,
        client=ClientPart(parts, int(split_layer)),
        server=ServerPart(parts, int(split_layer)),
        split_layer=int(split_layer),
        num_layers=num_layers,
    )
