"""A client of split federated learning (spec §1): its data stream and its half of an iteration.

A client runs the embeddings and blocks ``1..split_layer`` with its own LoRA tensors, sends the
cut-layer activations (detached: what a network would carry), attention mask and labels to the
main server, and later back-propagates the activation gradient the main server returns
(:mod:`sflllm.sfl.protocol` composes these steps).  Its data order is a pure function of
``(seed, client, epoch)``, so the cursor ``(epoch, position)`` is its only data state; its dropout
draws from its own random stream (:class:`~sflllm.sfl.rng.PartyRng`, seeded from ``(seed, "client.k")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from sflllm.data import TokenizedExamples
from sflllm.sfl.adapter import Adapter
from sflllm.sfl.rng import PartyRng


@dataclass(frozen=True)
class Batch:
    """One mini-batch of b right-padded sequences (labels are -100 where no loss is taken)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Cursor:
    """Position in a client's data stream: ``position`` rows of epoch ``epoch``'s order are used."""

    epoch: int = 0
    position: int = 0


def epoch_order(num_examples: int, seed: int, client: int, epoch: int) -> np.ndarray:
    """The row order of ``epoch`` for ``client``: a permutation drawn from ``(seed, client, epoch)``."""
    return np.random.default_rng([seed, client, epoch]).permutation(num_examples)


def next_indices(
    num_examples: int, batch_size: int, seed: int, client: int, cursor: Cursor
) -> tuple[np.ndarray, Cursor]:
    """The next ``batch_size`` row indices and the advanced cursor.

    A batch that reaches the end of an epoch continues with the next epoch's order, so every batch
    has exactly ``batch_size`` rows (and per-round sample counts are exact).
    """
    if num_examples < 1:
        raise ValueError("a client needs at least one example")
    taken: list[np.ndarray] = []
    epoch, position, need = cursor.epoch, cursor.position, batch_size
    while need > 0:
        order = epoch_order(num_examples, seed, client, epoch)
        chunk = order[position : position + need]
        taken.append(chunk)
        need -= len(chunk)
        position += len(chunk)
        if position == num_examples:
            epoch, position = epoch + 1, 0
    return np.concatenate(taken), Cursor(epoch, position)


class ClientState:
    """What one client holds: its adapter (LoRA tensors + AdamW), its data cursor and its random stream.

    ``data`` is the client's ``TokenizedExamples`` (``input_ids``/``attention_mask``/``labels``,
    shape (D_k, s)); it is shared, read-only, with the caller, and stays where it is: each batch is
    moved to ``device`` (the model's), where the client's random stream also draws.
    """

    def __init__(self, index: int, data: TokenizedExamples, adapter: Adapter, *, seed: int, batch_size: int,
                 device: torch.device | str | None = None) -> None:
        self.index = index
        self.device = torch.device("cpu" if device is None else device)
        self.adapter = adapter
        self.cursor = Cursor()
        self._seed = seed
        self._batch_size = batch_size
        self._data = data
        self.rng = PartyRng(seed, f"client.{index}", self.device)

    @property
    def num_examples(self) -> int:
        """D_k, the client's local data size (its FedAvg weight)."""
        return len(self._data)

    def batch_at(self, cursor: Cursor) -> tuple[Batch, Cursor]:
        """The batch that starts at ``cursor``, and the cursor after it."""
        rows, after = next_indices(self.num_examples, self._batch_size, self._seed, self.index, cursor)
        index = torch.from_numpy(rows)
        data, device = self._data, self.device
        rows_of = [t[index].to(device) for t in (data.input_ids, data.attention_mask, data.labels)]
        return Batch(*rows_of), after

    def next_batch(self) -> Batch:
        """The batch at the cursor; advances the cursor."""
        batch, self.cursor = self.batch_at(self.cursor)
        return batch


def client_forward(client_module: torch.nn.Module, lora: dict[str, Tensor], batch: Batch) -> Tensor:
    """Embeddings + blocks 1..split_layer with this client's LoRA tensors: hidden (b, s, d), graph kept."""
    return functional_call(client_module, lora, (batch.input_ids, batch.attention_mask))
