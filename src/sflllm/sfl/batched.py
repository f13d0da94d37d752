"""Batched clients: the K client forwards and backwards of a local iteration as one computation.

The K simulated clients share one frozen base and differ only in their LoRA tensors.  So the K
client batches are concatenated into one batch of K*b rows and run through the client part ONCE,
with every peft LoRA layer's ``lora_A``/``lora_B`` swapped, for the duration of the forward, for a
:class:`GroupedLoRA` that holds the K clients' tensors stacked (K, out, in) and multiplies rows
``k*b..(k+1)*b`` by client k's tensors (one ``torch.bmm``).  The stack is built with ``torch.stack``
from each client's leaf tensors, so one backward of the concatenated activation gradient puts
client k's gradient on client k's adapter.  Sequences do not interact in a causal LM (the argument
that lets the main server concatenate, :func:`~sflllm.sfl.main_server.server_losses`), so this
equals the sequential path up to float rounding (tested, K in {1, 3, 7}).

Random streams: a batched pass draws dropout masks once for all K*b rows, which cannot reproduce
each client's own stream (:class:`~sflllm.sfl.rng.PartyRng`); ``torch.func.vmap``'s
``randomness="different"`` cannot either.  So the batched path runs only where the client part
draws nothing (:func:`draws_randomness` is False: every dropout probability is 0, LoRA's included),
and a request for it elsewhere is refused; ``"auto"`` then falls back to the sequential path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from sflllm.sfl.adapter import step_adapters
from sflllm.sfl.client import Batch, ClientState
from sflllm.sfl.messages import CutActivations, CutGradients, check_gradients
from sflllm.sfl.precision import quantize_cut

ClientBatching = Literal["auto", "sequential", "batched"]
CLIENT_BATCHINGS = ("auto", "sequential", "batched")


class GroupedLoRA(nn.Module):
    """A LoRA factor for K clients at once: rows of group k (K equal groups, in order) times ``weight[k]``.

    ``weight`` (K, out, in) plays the role of K ``nn.Linear(in, out, bias=False)`` weights; its dtype
    is what peft casts the layer input to.
    """

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight  # a plain attribute: a non-leaf tensor that carries the stack's graph

    def forward(self, x: Tensor) -> Tensor:
        groups, width = self.weight.shape[0], x.shape[-1]
        out = torch.bmm(x.reshape(groups, -1, width), self.weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.weight.shape[1])


def draws_randomness(module: nn.Module) -> bool:
    """True if ``module`` in train mode would draw random numbers: a dropout with p > 0, or an attention
    whose ``attention_dropout`` probability (Llama-like families) is > 0."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            return True
    return False


def _lora_slots(client_module: nn.Module, names: Sequence[str]) -> list[tuple[nn.ModuleDict, str, str]]:
    """For every LoRA tensor name ``<layer>.lora_A.<adapter>.weight`` (or ``lora_B``): the ModuleDict that
    holds its ``nn.Linear``, the adapter key and the name; ValueError for anything else (DoRA, embeddings)."""
    slots = []
    for name in names:
        parts = name.split(".")
        if len(parts) < 4 or parts[-1] != "weight" or parts[-3] not in ("lora_A", "lora_B"):
            raise ValueError(f"batched clients support plain LoRA on linear layers only; cannot group {name!r}")
        holder = client_module.get_submodule(".".join(parts[:-2]))
        linear = holder[parts[-2]]
        layer = client_module.get_submodule(".".join(parts[:-3]))
        if not isinstance(linear, nn.Linear) or linear.bias is not None or getattr(layer, "lora_variant", {}):
            raise ValueError(f"batched clients support plain LoRA on linear layers only; cannot group {name!r}")
        slots.append((holder, parts[-2], name))
    return slots


def check_batchable(client_module: nn.Module, names: Sequence[str]) -> None:
    """ValueError unless the client part can run its clients batched (see the module docstring)."""
    if draws_randomness(client_module):
        raise ValueError("client_batching='batched' needs a client part without dropout (lora_dropout and the "
                         "model's dropouts 0): one batched pass cannot draw each client's own random stream; "
                         "use 'sequential' or 'auto'")
    _lora_slots(client_module, names)


def batching_applies(client_module: nn.Module, names: Sequence[str], batching: ClientBatching) -> bool:
    """Whether a local iteration runs its clients batched: ``"batched"`` (checked: ValueError if it
    cannot), ``"sequential"`` never, ``"auto"`` wherever it can."""
    if batching not in CLIENT_BATCHINGS:
        raise ValueError(f"client_batching must be one of {CLIENT_BATCHINGS}, got {batching!r}")
    if batching == "sequential":
        return False
    try:
        check_batchable(client_module, names)
    except ValueError:
        if batching == "batched":
            raise
        return False
    return True


@contextmanager
def grouped_lora(client_module: nn.Module, loras: Sequence[dict[str, Tensor]]) -> Iterator[None]:
    """Within the block, the LoRA layers of ``client_module`` compute with the K stacked ``loras`` (in
    client order) over K equal groups of rows; the original ``nn.Linear`` factors are put back afterwards."""
    slots = _lora_slots(client_module, list(loras[0]))
    originals = [(holder, key, holder[key]) for holder, key, _ in slots]
    try:
        for holder, key, name in slots:
            holder[key] = GroupedLoRA(torch.stack([lora[name] for lora in loras]))
        yield
    finally:
        for holder, key, original in originals:
            holder[key] = original


def batched_forward(client_module: nn.Module, clients: Sequence[ClientState], *,
                    act_bits: int = 32) -> tuple[Tensor, list[CutActivations]]:
    """The K clients' next batches through the client part as one batch: the concatenated hidden
    (K*b, s, d) with its graph, and each client's :class:`CutActivations` (detached rows of it, sent
    with ``act_bits`` bits per value as :func:`~sflllm.sfl.client_step_forward` sends them).

    The clients' random streams are not touched: the caller has checked that nothing draws.
    """
    batches: list[Batch] = [client.next_batch() for client in clients]
    input_ids = torch.cat([b.input_ids for b in batches])
    attention_mask = torch.cat([b.attention_mask for b in batches])
    with grouped_lora(client_module, [client.adapter.tensors for client in clients]), torch.enable_grad():
        hidden = client_module(input_ids, attention_mask)
    parts = torch.split(quantize_cut(hidden.detach(), act_bits), [len(b) for b in batches])
    return hidden, [CutActivations(h, b.attention_mask, b.labels, client.adapter.found_inf)
                    for h, b, client in zip(parts, batches, clients, strict=True)]


def batched_backward(hidden: Tensor, clients: Sequence[ClientState], gradients: Sequence[CutGradients]) -> None:
    """Back-propagate the K received activation gradients through the one batched forward, then one AdamW
    step per client, run together (:func:`~sflllm.sfl.adapter.step_adapters`; each unscaled by its
    payload's ``loss_scale`` and skipped on its own inf/nan, as :func:`~sflllm.sfl.client_step_backward`
    does).  Every payload is checked before anything is back-propagated."""
    rows = hidden.shape[0] // len(clients)
    for k, payload in enumerate(gradients):
        check_gradients(payload, hidden[k * rows : (k + 1) * rows], sender=f"main server (to client {k})")
    hidden.backward(torch.cat([g.grad for g in gradients]))
    step_adapters([client.adapter for client in clients], [payload.loss_scale for payload in gradients])
