"""The main server (MS) of split federated learning (spec §1).

Per local iteration the MS receives K clients' cut-layer activations and labels, runs blocks
``split_layer+1..L``, the final norm and the LM head, and

* updates its server adapter once from the **mean** of the K clients' losses
  (``server_adapter="shared"``), or each client's own server adapter from that client's loss
  (``server_adapter="per_client"``);
* returns to client k the gradient of **client k's own loss** with respect to its activations,
  i.e. it back-propagates ``sum_k loss_k`` into the activations.  Client k's adapter therefore
  follows the gradient of its own local objective (FedAvg semantics), and with K=1 SFL performs
  exactly the computation of centralized LoRA training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from sflllm.model import lm_loss_groups
from sflllm.sfl.adapter import Adapter
from sflllm.sfl.loss_scale import scale_loss
from sflllm.sfl.messages import CutActivations


def received(cuts: Sequence[CutActivations]) -> list[Tensor]:
    """The activations as the MS holds them: detached leaves that will collect their gradients."""
    return [cut.hidden.detach().requires_grad_(True) for cut in cuts]


def server_losses(server_module: torch.nn.Module, lora: dict[str, Tensor], activations: Sequence[Tensor],
                  cuts: Sequence[CutActivations]) -> Tensor:
    """Each client's loss through one server adapter (shape (K,)), the K batches run as one concatenated batch.

    ``activations[k]`` is client k's hidden (as :func:`received` gives it), ``cuts[k]`` its payload
    (attention mask and labels).  Sequences do not interact in a causal LM, so this equals K separate
    server passes up to float rounding (tested); it is what makes the MS as fast per sample as
    centralized training.  The K means come from one cross-entropy over the batch
    (:func:`~sflllm.model.lm_loss_groups`), so the logits are not split per client.
    """
    hidden = torch.cat(list(activations)) if len(activations) > 1 else activations[0]
    mask = torch.cat([c.attention_mask for c in cuts]) if len(cuts) > 1 else cuts[0].attention_mask
    labels = torch.cat([c.labels for c in cuts]) if len(cuts) > 1 else cuts[0].labels
    logits = functional_call(server_module, lora, (hidden, mask))
    return lm_loss_groups(logits, labels, [len(c) for c in cuts])


def serve_shared(server_module: torch.nn.Module, adapter: Adapter, cuts: Sequence[CutActivations], *,
                 server_chunk: int | None = None, loss_scale: float = 1.0) -> tuple[list[float], list[Tensor]]:
    """One MS iteration with the single shared server adapter.

    Returns the K losses and the K activation gradients d (S loss_k) / d activations_k, S =
    ``loss_scale`` (:mod:`sflllm.sfl.loss_scale`; 1 without scaling).  The adapter takes one AdamW
    step on d (1/K sum_k loss_k) / d W_server (or skips it where float16 overflowed).

    ``server_chunk`` = N runs the K clients' activations in chunks of N clients (None: all K as one
    batch), accumulating the adapter's gradient over the chunks: the same gradients up to float
    rounding (tested), while the server's graph and logits exist for N clients at a time, so its
    peak memory no longer grows with K.  With dropout in the server blocks the masks are drawn per
    chunk, so they differ from one batch's (same distribution, same stream).
    """
    num_clients = len(cuts)
    chunk = num_clients if server_chunk is None else server_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"server_chunk must be an integer >= 1 or None, got {server_chunk!r}")
    losses: list[float] = []
    activation_grads: list[Tensor] = []
    adapter_grads: list[Tensor] | None = None
    for start in range(0, num_clients, chunk):
        part = cuts[start : start + chunk]
        activations = received(part)
        part_losses = server_losses(server_module, adapter.tensors, activations, part)
        grads = torch.autograd.grad(scale_loss(part_losses.sum(), loss_scale), [*activations, *adapter.tensors.values()])
        activation_grads += grads[: len(part)]
        summed = grads[len(part) :]
        if adapter_grads is None:
            adapter_grads = list(summed)
        else:
            adapter_grads = [a + g for a, g in zip(adapter_grads, summed, strict=True)]
        losses += part_losses.tolist()
    adapter.set_gradients({n: g / num_clients for n, g in zip(adapter.tensors, adapter_grads, strict=True)})
    adapter.step(loss_scale)
    return losses, activation_grads


def serve_per_client(server_module: torch.nn.Module, adapters: Sequence[Adapter],
                     cuts: Sequence[CutActivations], *, loss_scale: float = 1.0) -> tuple[list[float], list[Tensor]]:
    """One MS iteration with one server adapter per client, each stepped on its own client's loss
    (scaled by ``loss_scale`` as in :func:`serve_shared`)."""
    losses: list[float] = []
    activation_grads: list[Tensor] = []
    for adapter, cut in zip(adapters, cuts, strict=True):
        (act,) = received([cut])
        loss = server_losses(server_module, adapter.tensors, [act], [cut])[0]
        grads = torch.autograd.grad(scale_loss(loss, loss_scale), [act, *adapter.tensors.values()])
        adapter.set_gradients(dict(zip(adapter.tensors, grads[1:], strict=True)))
        adapter.step(loss_scale)
        losses.append(loss.item())
        activation_grads.append(grads[0])
    return losses, activation_grads
