"""The federated server (FS): FedAvg of adapters and broadcast (spec §1).

At the end of a round every client uploads its client adapter; the FS computes, for every LoRA
tensor separately, ``W = sum_k D_k / D * W_k`` with D_k the client's local data size and
``D = sum_k D_k``, and broadcasts W to all clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sflllm.sfl.adapter import Adapter


def fedavg(adapters: Sequence[Mapping[str, Tensor]], data_sizes: Sequence[int]) -> dict[str, Tensor]:
    """Data-size-weighted average of K adapters, tensor by tensor: ``sum_k D_k/D * W_k`` (spec §1)."""
    if len(adapters) != len(data_sizes) or not adapters:
        raise ValueError(f"fedavg needs one data size per adapter, got {len(adapters)} adapters "
                         f"and {len(data_sizes)} sizes")
    if any(size <= 0 for size in data_sizes):
        raise ValueError(f"fedavg data sizes must be positive, got {list(data_sizes)}")
    names = list(adapters[0])
    for k, adapter in enumerate(adapters):
        if list(adapter) != names:
            raise ValueError(f"adapter {k} has LoRA tensors {sorted(adapter)}, expected {sorted(names)}")
    total = float(sum(data_sizes))
    weights = [size / total for size in data_sizes]
    with torch.no_grad():
        return {
            name: sum(w * adapter[name].detach() for w, adapter in zip(weights, adapters, strict=True))
            for name in names
        }


def aggregate_and_broadcast(adapters: Sequence[Adapter], data_sizes: Sequence[int]) -> None:
    """FedAvg the parties' LoRA tensors and write the result into every party (optimizer states stay local)."""
    average = fedavg([a.tensors for a in adapters], data_sizes)
    for adapter in adapters:
        adapter.assign(average)
