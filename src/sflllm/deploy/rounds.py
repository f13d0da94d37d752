"""A round of SFL over the data plane (spec §1), and the federated server's part of it with client drops.

:func:`client_round` is what client k runs in a round: I local iterations of
``client_step_forward`` -> :meth:`DataPlaneClient.exchange` -> ``client_step_backward``.
:func:`federated_round` is a one-process rehearsal of a deployed round: each client runs
:func:`client_round` in its own thread against the main server's :class:`MainServerPlane` over
real gRPC/TLS, then the federated server averages the adapters of the clients that completed the
round.

A client that fails or times out mid-round is dropped from that round: the main server goes on
without it, its partial work (its client adapter) is discarded, FedAvg is renormalised over the
others (weights D_k / sum of the survivors' D_k) and the result is broadcast to every client, so a
dropped client rejoins the next round from the global adapter.  The main server's steps already
taken with the dropped client's earlier payloads of the round are kept (they were valid updates).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from sflllm.deploy.dataplane import DataPlaneClient, MainServerPlane
from sflllm.sfl import Adapter, ClientState, Federation, client_step_backward, client_step_forward, fedavg
from sflllm.sfl.federation import round_stats, training


def client_round(client_module: torch.nn.Module, client: ClientState, plane: DataPlaneClient, round_index: int,
                 local_steps: int, compute_lock: AbstractContextManager[Any] | None = None) -> None:
    """Client k's I local iterations of round ``round_index`` against the main server over the data plane.

    ``compute_lock``, when given, is held while the client computes (one-process rehearsal: the
    parties share torch's global RNG).  Raises :class:`~sflllm.deploy.DataPlaneError` if an exchange fails.
    """
    lock = compute_lock if compute_lock is not None else nullcontext()
    for i in range(local_steps):
        with lock:
            pending, cut = client_step_forward(client_module, client, act_bits=plane.spec.act_bits)
        grads = plane.exchange(cut, round_index, i)
        with lock:
            client_step_backward(client_module, client.adapter, pending, grads)


def main_server_plane(fed: Federation, token: str, *, client_timeout: float,
                      compute_lock: AbstractContextManager[Any] | None = None) -> MainServerPlane:
    """The main server of ``fed`` (mode sfl) on the data plane: its server part, server adapter(s),
    RNG, cut spec, ``server_chunk`` and float16 loss scaler, for up to all of its clients."""
    return MainServerPlane(fed.split.server, fed.servers, fed.server_rng, fed.cut_spec, token,
                           client_timeout=client_timeout, compute_lock=compute_lock, max_clients=fed.num_clients,
                           server_chunk=fed.hyper.server_chunk, loss_scaler=fed.loss_scaler)


def broadcast_average(adapters: Sequence[Adapter], data_sizes: Sequence[int], to: Sequence[Adapter]) -> None:
    """FedAvg of ``adapters`` with weights ``data_sizes`` (renormalised over them), written into every
    adapter of ``to`` (the survivors and the dropped alike)."""
    average = fedavg([a.tensors for a in adapters], data_sizes)
    for adapter in to:
        adapter.assign(average)


def federated_round(fed: Federation, plane: MainServerPlane, planes: Sequence[DataPlaneClient], round_index: int,
                    *, compute_lock: threading.Lock, busy: dict[int, threading.Thread] | None = None) -> dict:
    """Round ``round_index`` of ``fed`` (mode sfl) with every client in a thread over the data plane.

    ``planes[k]`` is client k's :class:`DataPlaneClient` to ``plane``.  ``busy`` (the caller keeps it
    across rounds) maps a client dropped earlier to its thread, which may still be running: such a
    client sits this round out (reported as dropped) until its thread has ended; this round's
    dropped clients are added.  Returns the round's metrics (:func:`~sflllm.sfl.federation.round_stats`
    over the clients that completed it) plus ``"dropped"``: ``{client: reason}`` as strings, for
    metrics.json.  Raises RuntimeError if every client was dropped.
    """
    if fed.hyper.mode != "sfl":
        raise ValueError(f"federated_round runs mode 'sfl', not {fed.hyper.mode!r}")
    clients, busy = fed.clients, {} if busy is None else busy
    for k in [k for k, thread in busy.items() if not thread.is_alive()]:
        del busy[k]
    sitting_out = {k: "still running its part of an earlier round" for k in busy}
    taking_part = [k for k in range(len(clients)) if k not in sitting_out]

    def run(k: int) -> None:
        try:
            client_round(fed.split.client, clients[k], planes[k], round_index, fed.hyper.local_steps, compute_lock)
        except Exception as err:  # a failed client is dropped; the round goes on
            plane.drop(k, f"{type(err).__name__}: {err}", round_index)

    plane.begin_round(round_index, taking_part, fed.hyper.local_steps)
    with training(fed.split.full):
        threads = {k: threading.Thread(target=run, args=(k,), name=f"sflllm-client-{k}", daemon=True)
                   for k in taking_part}
        for thread in threads.values():
            thread.start()
        # wait for every client that is still in the round; a dropped one may be stuck: leave it
        while any(t.is_alive() and k not in plane.dropped for k, t in threads.items()):
            time.sleep(0.005)
    report = plane.end_round()
    busy |= {k: threads[k] for k in report.dropped if threads[k].is_alive()}
    dropped = sitting_out | report.dropped
    survivors = [k for k in taking_part if k not in dropped]
    with compute_lock:  # a dropped client's thread may still be finishing a step
        return close_round(fed, round_index, report.losses, survivors, dropped)


def close_round(fed: Federation, round_index: int, losses: Sequence[float], survivors: Sequence[int],
                dropped: dict[int, str]) -> dict:
    """The federated server's end of a round that ``survivors`` completed: FedAvg of their client
    adapters (and per-client server adapters) with weights D_k (their ``num_examples`` in ``fed``)
    renormalised over them, broadcast to every client (dropped ones included), and the round's
    metrics plus ``"dropped"`` (``{client: reason}`` as strings, for metrics.json).  Raises
    RuntimeError if no client completed the round."""
    if not survivors:
        raise RuntimeError(f"round {round_index}: every client was dropped ({dict(sorted(dropped.items()))})")
    clients = fed.clients
    if len(clients) > 1:
        sizes = [clients[k].num_examples for k in survivors]
        broadcast_average([clients[k].adapter for k in survivors], sizes, fed.client_adapters)
        if len(fed.servers) == len(clients):
            broadcast_average([fed.servers[k] for k in survivors], sizes, fed.servers)
    stats = round_stats(round_index, list(losses), fed.hyper, len(survivors))
    return stats | {"dropped": {str(k): reason for k, reason in sorted(dropped.items())}}
