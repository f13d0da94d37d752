"""The steps of one SFL local iteration (spec §1), as functions that any runtime calls.

One local iteration, for the K clients and the main server::

    pending_k, cut_k = client_step_forward(split.client, client_k)        # on client k
    losses, grads = main_server_step(split.server, servers, rng, cuts, spec)   # on the main server
    client_step_backward(split.client, client_k.adapter, pending_k, grads[k])  # on client k

and at the end of a round the federated server runs :func:`aggregate_and_broadcast` (FedAvg).
Only :class:`CutActivations` travel up and :class:`CutGradients` down; each side validates what it
receives.  The in-process engine (:func:`split_iteration`, :class:`~sflllm.sfl.Federation`) and the
Flower runtimes drive these same functions.  A runtime that cannot keep the client's autograd graph
between the two client steps (one handler per message) calls ``client_step_forward(...,
keep_graph=False)``: the backward step then recomputes the forward from (adapter, batch, the
client's random stream before the forward), which gives identical results (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from sflllm.model import lm_loss
from sflllm.sfl.adapter import Adapter
from sflllm.sfl.batched import ClientBatching, batched_backward, batched_forward, batching_applies
from sflllm.sfl.client import Batch, ClientState, client_forward
from sflllm.sfl.federated_server import aggregate_and_broadcast
from sflllm.sfl.loss_scale import LossScaler, loss_scaling_applies, scale_loss
from sflllm.sfl.main_server import serve_per_client, serve_shared
from sflllm.sfl.messages import CutActivations, CutGradients, CutSpec, check_activations, check_gradients
from sflllm.sfl.precision import quantize_cut
from sflllm.sfl.rng import PartyRng, replayed


@dataclass(frozen=True)
class PendingBackward:
    """What a client keeps from its forward step until the main server's gradient arrives.

    ``rng_state`` is the client's random stream *before* the forward: replaying it recomputes the
    same dropout masks.  ``hidden`` is the forward's output with its autograd graph, or None when
    the backward step is to recompute it.
    """

    batch: Batch
    rng_state: Tensor
    hidden: Tensor | None = None


def client_step_forward(client_module: torch.nn.Module, client: ClientState, *,
                        keep_graph: bool = True, act_bits: int = 32) -> tuple[PendingBackward, CutActivations]:
    """Client k's forward: its next batch through embeddings + blocks 1..split_layer on its own stream.

    Returns what the client keeps and what it sends: activations (with ``act_bits`` bits per value,
    :func:`quantize_cut`), attention mask and labels (never the token ids), and whether its previous
    step found inf/nan (float16, :mod:`sflllm.sfl.loss_scale`).  The client keeps its unquantised
    graph: the backward pass is straight-through.
    """
    batch = client.next_batch()
    rng_state = client.rng.state
    with client.rng.active(), torch.set_grad_enabled(keep_graph):
        hidden = client_forward(client_module, client.adapter.tensors, batch)
    pending = PendingBackward(batch, rng_state, hidden if keep_graph else None)
    return pending, CutActivations(quantize_cut(hidden.detach(), act_bits), batch.attention_mask, batch.labels,
                                   client.adapter.found_inf)


def recompute_forward(client_module: torch.nn.Module, lora: Mapping[str, Tensor], batch: Batch,
                      rng_state: Tensor) -> Tensor:
    """The client's forward again, with its graph, from (adapter, batch, stream state before the forward)."""
    with replayed(rng_state, batch.input_ids.device), torch.enable_grad():
        return client_forward(client_module, dict(lora), batch)


def client_step_backward(client_module: torch.nn.Module, adapter: Adapter, pending: PendingBackward,
                         gradients: CutGradients) -> bool:
    """Client k's backward: back-propagate the received activation gradient, then one AdamW step on
    the gradients unscaled by ``gradients.loss_scale``, skipped if they are not finite (float16, see
    :mod:`sflllm.sfl.loss_scale`); returns whether it was skipped (the adapter keeps it to report)."""
    hidden = pending.hidden
    if hidden is None:
        hidden = recompute_forward(client_module, adapter.tensors, pending.batch, pending.rng_state)
    check_gradients(gradients, hidden)
    hidden.backward(gradients.grad)
    return adapter.step(gradients.loss_scale)


def main_server_step(server_module: torch.nn.Module, adapters: Sequence[Adapter], rng: PartyRng,
                     cuts: Sequence[CutActivations], spec: CutSpec, *,
                     server_chunk: int | None = None,
                     loss_scaler: LossScaler | None = None) -> tuple[list[float], list[CutGradients]]:
    """The main server's iteration over the K clients' payloads (in client order), on its own stream.

    With one adapter it is shared (one AdamW step on the mean loss; ``server_chunk`` = N runs it N
    clients at a time, see :func:`~sflllm.sfl.main_server.serve_shared`); with K, adapter k serves
    client k (one client at a time).  Returns the K losses and the K gradient payloads.  Each payload
    is validated first, so a malformed one changes nothing.

    A float16 cut needs the main server's ``loss_scaler`` (and only a float16 one has it): before
    anything is computed it applies the previous iteration's update from the server adapters' and the
    clients' ``found_inf`` (:meth:`LossScaler.update`), then the losses are scaled by S and every
    payload carries S (:mod:`sflllm.sfl.loss_scale`).
    """
    for k, cut in enumerate(cuts):
        check_activations(cut, spec, sender=f"client {k}")
    if len(adapters) not in (1, len(cuts)):
        raise ValueError(f"main server has {len(adapters)} server adapters for {len(cuts)} clients")
    if loss_scaling_applies(spec.dtype) != (loss_scaler is not None):
        raise ValueError(f"main server: a {spec.dtype} cut needs "
                         f"{'a' if loss_scaling_applies(spec.dtype) else 'no'} loss_scaler (float16 only)")
    scale = 1.0
    if loss_scaler is not None:
        scale = loss_scaler.update([*(a.found_inf for a in adapters), *(cut.found_inf for cut in cuts)])
    with rng.active():
        if len(adapters) == 1:
            losses, grads = serve_shared(server_module, adapters[0], cuts, server_chunk=server_chunk, loss_scale=scale)
        else:
            losses, grads = serve_per_client(server_module, adapters, cuts, loss_scale=scale)
    return losses, [CutGradients(quantize_cut(g, spec.act_bits), scale) for g in grads]


def split_iteration(client_module: torch.nn.Module, server_module: torch.nn.Module, clients: Sequence[ClientState],
                    servers: Sequence[Adapter], server_rng: PartyRng, spec: CutSpec, *,
                    client_batching: ClientBatching = "sequential", server_chunk: int | None = None,
                    loss_scaler: LossScaler | None = None) -> list[float]:
    """One synchronous local iteration over the cut, in one process (spec §1): forward, MS step, backward.

    ``client_batching`` runs the K client forwards and backwards one by one (``"sequential"``) or as one
    batched computation (``"batched"``, :mod:`sflllm.sfl.batched`; ``"auto"``: batched where the client
    part draws no random numbers); ``server_chunk`` bounds the main server's batch and ``loss_scaler``
    is the main server's for a float16 cut (:func:`main_server_step`).
    """
    names = list(clients[0].adapter.tensors)
    if len(clients) > 1 and batching_applies(client_module, names, client_batching):
        hidden, cuts = batched_forward(client_module, clients, act_bits=spec.act_bits)
        losses, grads = main_server_step(server_module, servers, server_rng, cuts, spec, server_chunk=server_chunk,
                                         loss_scaler=loss_scaler)
        batched_backward(hidden, clients, grads)
        return losses
    forwards = [client_step_forward(client_module, client, act_bits=spec.act_bits) for client in clients]
    losses, grads = main_server_step(server_module, servers, server_rng, [cut for _, cut in forwards], spec,
                                     server_chunk=server_chunk, loss_scaler=loss_scaler)
    for client, (pending, _), grad in zip(clients, forwards, grads, strict=True):
        client_step_backward(client_module, client.adapter, pending, grad)
    return losses


def full_model_step(model: torch.nn.Module, client: ClientState, lora: Mapping[str, Tensor],
                    adapters: Sequence[Adapter], *, loss_scale: float = 1.0) -> float:
    """One AdamW step of the whole model (no cut: centralized and fl) on the client's next batch.

    ``lora`` maps the model's LoRA parameter names to the tensors of ``adapters`` (client and server
    part), which all step (each skips on its own inf/nan with a float16 base: the loss is scaled by
    ``loss_scale``, :mod:`sflllm.sfl.loss_scale`).  Runs on the client's stream.
    """
    batch = client.next_batch()
    with client.rng.active():
        out = functional_call(model, dict(lora), (),
                              {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        loss = lm_loss(out.logits, batch.labels)
    scale_loss(loss, loss_scale).backward()
    for adapter in adapters:
        adapter.step(loss_scale)
    return loss.item()


__all__ = [
    "PendingBackward",
    "aggregate_and_broadcast",
    "client_step_backward",
    "client_step_forward",
    "full_model_step",
    "main_server_step",
    "recompute_forward",
    "split_iteration",
]
