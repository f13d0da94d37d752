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

from sflllm.model import lm_loss
from sflllm.sfl.adapter import Adapter
from sflllm.sfl.client import Batch


def check_cut(activations: Sequence[Tensor], batches: Sequence[Batch], hidden_size: int, dtype: torch.dtype) -> None:
    """Validate what arrived over the uplink: client k's activations are (b_k, s_k, d) of the model dtype."""
    for k, (act, batch) in enumerate(zip(activations, batches, strict=True)):
        expected = (*batch.labels.shape, hidden_size)
        if tuple(act.shape) != expected or act.dtype != dtype:
            raise ValueError(
                f"client {k}: activations at the cut have shape {tuple(act.shape)} {act.dtype}, "
                f"expected {expected} {dtype}"
            )


def server_losses(server_module: torch.nn.Module, lora: dict[str, Tensor], activations: Sequence[Tensor],
                  batches: Sequence[Batch]) -> list[Tensor]:
    """Each client's loss through one server adapter, the K batches run as one concatenated batch.

    Sequences do not interact in a causal LM, so this equals K separate server passes up to float
    rounding (tested); it is what makes the MS as fast per sample as centralized training.
    """
    hidden = torch.cat(list(activations)) if len(activations) > 1 else activations[0]
    mask = torch.cat([b.attention_mask for b in batches]) if len(batches) > 1 else batches[0].attention_mask
    logits = functional_call(server_module, lora, (hidden, mask))
    sizes = [len(b) for b in batches]
    return [lm_loss(part, b.labels) for part, b in zip(torch.split(logits, sizes), batches, strict=True)]


def serve_shared(server_module: torch.nn.Module, adapter: Adapter, activations: Sequence[Tensor],
                 batches: Sequence[Batch]) -> tuple[list[float], list[Tensor]]:
    """One MS iteration with the single shared server adapter.

    Returns the K losses and the K activation gradients d loss_k / d activations_k.  The adapter
    takes one AdamW step on d (1/K sum_k loss_k) / d W_server.
    """
    names = list(adapter.tensors)
    losses = server_losses(server_module, adapter.tensors, activations, batches)
    grads = torch.autograd.grad(
        torch.stack(losses).sum(), [*activations, *adapter.tensors.values()]
    )
    num_clients = len(activations)
    adapter.set_gradients({n: g / num_clients for n, g in zip(names, grads[num_clients:], strict=True)})
    adapter.step()
    return [loss.item() for loss in losses], list(grads[:num_clients])


def serve_per_client(server_module: torch.nn.Module, adapters: Sequence[Adapter], activations: Sequence[Tensor],
                     batches: Sequence[Batch]) -> tuple[list[float], list[Tensor]]:
    """One MS iteration with one server adapter per client, each stepped on its own client's loss."""
    losses: list[float] = []
    activation_grads: list[Tensor] = []
    for adapter, act, batch in zip(adapters, activations, batches, strict=True):
        (loss,) = server_losses(server_module, adapter.tensors, [act], [batch])
        grads = torch.autograd.grad(loss, [act, *adapter.tensors.values()])
        adapter.set_gradients(dict(zip(adapter.tensors, grads[1:], strict=True)))
        adapter.step()
        losses.append(loss.item())
        activation_grads.append(grads[0])
    return losses, activation_grads
