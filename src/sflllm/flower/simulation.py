"""The SFL protocol (spec §1) in Flower's Simulation Engine: ``sflllm train --engine flower-sim``.

A ``ServerApp`` hosts the main server and the federated server; one ``ClientApp`` per client (one
Flower SuperNode each, client k = the node's ``partition-id``).  A round is ``local_steps + 2``
message exchanges with every client, all typed records (ArrayRecord of raw tensor bytes,
MetricRecord), nothing pickled:

* ``train.step`` (I of them): down, the CutGradients of the previous iteration (none in the first);
  the client back-propagates them (recomputing its forward: a handler keeps no autograd graph), steps
  AdamW, runs its next forward and replies with its CutActivations.  Between the two exchanges the
  main server runs :func:`sflllm.sfl.main_server_step` on the K payloads, in client order.
* ``train.upload``: the last iteration's gradients down; the client's adapter and D_k up.
* ``train.broadcast``: the FedAvg'd global adapter down; the client's state up, which the driver keeps
  as a checkpoint copy (resume, ``state_dict``).

The protocol steps are those of the in-process engine (:mod:`sflllm.sfl.protocol`), and every party
draws from its own random stream, so both engines give the same adapters and losses (tested).
Flower's ``run_simulation`` runs in a background thread; the driver hands it one job at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from torch import Tensor

from sflllm.flower.records import (
    ADAPTER,
    GRAD,
    META,
    STATE,
    activations_to_records,
    error_line,
    gradients_to_records,
    record_to_tensors,
    records_to_activations,
    records_to_gradients,
    tensors_to_record,
)
from sflllm.sfl import (
    ClientState,
    CutGradients,
    Cursor,
    Federation,
    PendingBackward,
    aggregate_and_broadcast,
    client_step_backward,
    client_step_forward,
    fedavg,
    main_server_step,
)
from sflllm.sfl.federation import Progress, check_state, client_state, load_client_state, round_stats, training

LoadClient = Callable[[int], tuple[torch.nn.Module, ClientState]]
"""``load_client(k) -> (client_module, client)``: client k's part of the split model and a client
with its data; called inside the simulation's worker processes (so it must be picklable)."""

PENDING = "pending"  # client context record: cursor and RNG state before the last forward
CONNECT_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- the clients
def make_client_app(load_client: LoadClient, act_bits: int = 32) -> ClientApp:
    """The ClientApp of every client: it keeps its whole state in its Flower context between messages;
    it sends its activations with ``act_bits`` bits per value (the run's ``CutSpec.act_bits``)."""
    app = ClientApp()

    def party(context: Context) -> tuple[int, torch.nn.Module, ClientState]:
        k = int(context.node_config["partition-id"])
        module, client = load_client(k)
        if STATE in context.state:
            load_client_state(record_to_tensors(context.state[STATE], f"client {k} state"), k, client)
        return k, module, client

    def save(context: Context, k: int, client: ClientState) -> None:
        context.state[STATE] = tensors_to_record(client_state(k, client))

    def backward(msg: Message, context: Context, module: torch.nn.Module, client: ClientState) -> None:
        """Back-propagate the received gradient through the recomputed forward of the pending batch."""
        grads = records_to_gradients(msg.content)
        pending = record_to_tensors(context.state[PENDING], "pending forward")
        epoch, position = (int(v) for v in pending["cursor"])
        batch, _ = client.batch_at(Cursor(epoch, position))
        with training(module):
            client_step_backward(module, client.adapter, PendingBackward(batch, pending["rng"]), grads)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        return Message(RecordDict({META: MetricRecord({"client": k})}), reply_to=msg)

    @app.query("load")
    def load(msg: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        _, client = load_client(k)
        load_client_state(record_to_tensors(msg.content[STATE], f"client {k} state"), k, client)
        save(context, k, client)
        return Message(RecordDict(), reply_to=msg)

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        k, module, client = party(context)
        if GRAD in msg.content:
            backward(msg, context, module, client)
        cursor = torch.tensor([client.cursor.epoch, client.cursor.position], dtype=torch.int64)
        with training(module):
            pending, cut = client_step_forward(module, client, keep_graph=False, act_bits=act_bits)
        context.state[PENDING] = tensors_to_record({"cursor": cursor, "rng": pending.rng_state})
        save(context, k, client)
        return Message(activations_to_records(cut), reply_to=msg)

    @app.train("upload")
    def upload(msg: Message, context: Context) -> Message:
        k, module, client = party(context)
        backward(msg, context, module, client)
        save(context, k, client)
        content = RecordDict({ADAPTER: tensors_to_record(client.adapter.tensors),
                              META: MetricRecord({"num_examples": client.num_examples})})
        return Message(content, reply_to=msg)

    @app.train("broadcast")
    def broadcast(msg: Message, context: Context) -> Message:
        k, _, client = party(context)
        adapter = record_to_tensors(msg.content[ADAPTER], "federated server: global adapter")
        check_state(adapter, client.adapter.tensors, "federated server: global adapter")
        client.adapter.assign(adapter)
        save(context, k, client)
        return Message(RecordDict({STATE: context.state[STATE]}), reply_to=msg)

    return app


# --------------------------------------------------------------------------- the main and federated server
class FlowerSimulation:
    """The SFL protocol in Flower's Simulation Engine, with the round interface of :class:`Federation`.

    ``federation`` is the driver's side: its split model's server part, server adapters and main
    server RNG are the main server's (live); its clients are a checkpoint copy of every client's
    state, refreshed at the end of each round (:meth:`state_dict`) and pushed to the ClientApps when
    the simulation starts (so :meth:`load_state_dict` resumes a run).  The simulation starts at
    :meth:`start` (or the first :meth:`run_round`); :meth:`close` stops it.
    """

    def __init__(self, federation: Federation, load_client: LoadClient, *,
                 backend_config: Mapping[str, Any] | None = None) -> None:
        if federation.hyper.mode != "sfl":
            raise ValueError(f"engine flower-sim runs mode 'sfl' only, not {federation.hyper.mode!r}")
        self.federation = federation
        self._load_client = load_client
        self._backend_config = dict(backend_config or {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # clients' errors come back in their replies; their log lines would only drown the progress bar
            "init_args": {"include_dashboard": False, "log_to_driver": False, "logging_level": "error"},
        })
        self._jobs: queue.Queue[Callable[[Grid], Any] | None] = queue.Queue()
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._nodes: list[int] = []

    # ------------------------------------------------------------ the round interface
    @property
    def num_clients(self) -> int:
        return self.federation.num_clients

    def run_round(self, round_index: int, progress: Progress | None = None) -> dict:
        """One SFL round through Flower (see the module docstring); the same report as Federation.run_round."""
        return self._call(lambda grid: self._round(grid, round_index, progress))

    def state_dict(self) -> dict[str, Tensor]:
        """The whole federation's state as of the last round (the clients' as they reported it)."""
        return self.federation.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a state; it reaches the ClientApps when the simulation starts."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict must come before the first run_round of a FlowerSimulation")
        self.federation.load_state_dict(state)

    def load_global_adapter(self) -> None:
        self.federation.load_global_adapter()

    def close(self) -> None:
        """Stop the simulation (a no-op when it never started)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._thread = None

    def __enter__(self) -> FlowerSimulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ running jobs in the ServerApp
    def start(self) -> None:
        """Start the simulation (Ray, the K ClientApps) and hand every client its state; idempotent."""
        if self._thread is not None:
            return
        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            while (job := self._jobs.get()) is not None:
                try:
                    self._results.put((True, job(grid)))
                except Exception as e:  # noqa: BLE001 - handed to the caller of _call
                    self._results.put((False, e))

        def simulate() -> None:
            try:
                run_simulation(server_app, make_client_app(self._load_client, self.federation.cut_spec.act_bits), num_supernodes=self.num_clients,
                               backend_config=self._backend_config)
            except BaseException as e:  # noqa: BLE001 - reported by _call
                self._failure = e

        for name in ("flwr", "ray"):  # their INFO/WARNING lines would drown the progress bar
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        self._thread = threading.Thread(target=simulate, name="flower-simulation", daemon=True)
        self._thread.start()
        self._call(self._connect, started=True)

    def _call(self, job: Callable[[Grid], Any], *, started: bool = False) -> Any:
        if self._thread is None and not started:
            self.start()
        self._jobs.put(job)
        while True:
            try:
                ok, value = self._results.get(timeout=0.5)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = None
                    raise RuntimeError(f"the Flower simulation stopped: {self._failure!r}") from self._failure
                continue
            if ok:
                return value
            raise value

    def _connect(self, grid: Grid) -> None:
        """Wait for the K SuperNodes, map client k to its node, and give every client its state."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.num_clients} Flower SuperNodes came up "
                                   f"within {CONNECT_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        self._nodes = sorted(nodes)
        replies = self._exchange(grid, "query.hello", [RecordDict()] * self.num_clients, by_node=True)
        clients = {node: int(reply[META]["client"]) for node, reply in replies.items()}
        if sorted(clients.values()) != list(range(self.num_clients)):
            raise RuntimeError(f"Flower SuperNodes report clients {sorted(clients.values())}, "
                               f"expected 0..{self.num_clients - 1}")
        self._nodes = sorted(clients, key=clients.__getitem__)
        self._exchange(grid, "query.load", [
            RecordDict({STATE: tensors_to_record(client_state(k, client))})
            for k, client in enumerate(self.federation.clients)
        ])

    def _exchange(self, grid: Grid, action: str, contents: Sequence[RecordDict], *,
                  by_node: bool = False) -> Any:
        """Send ``contents[k]`` to client k and return the replies in client order (or by node)."""
        messages = [Message(content, dst_node_id=node, message_type=action)
                    for node, content in zip(self._nodes, contents, strict=True)]
        replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages)}
        for k, node in enumerate(self._nodes):
            reply = replies.get(node)
            who = f"node {node}" if by_node else f"client {k}"
            if reply is None:
                raise RuntimeError(f"{who} sent no reply to {action}")
            if reply.has_error():
                raise RuntimeError(f"{who} failed {action}: {error_line(reply.error.reason)}")
        if by_node:
            return {node: replies[node].content for node in self._nodes}
        return [replies[node].content for node in self._nodes]

    # ------------------------------------------------------------ one round
    def _round(self, grid: Grid, round_index: int, progress: Progress | None) -> dict:
        fed, K, steps = self.federation, self.num_clients, self.federation.hyper.local_steps
        grads: list[CutGradients | None] = [None] * K
        losses: list[float] = []
        with training(fed.split.server):
            for i in range(steps):
                replies = self._exchange(grid, "train.step", [
                    RecordDict() if g is None else gradients_to_records(g) for g in grads
                ])
                cuts = [records_to_activations(reply, f"client {k}") for k, reply in enumerate(replies)]
                step_losses, grads = main_server_step(fed.split.server, fed.servers, fed.server_rng, cuts, fed.cut_spec,
                                                     loss_scaler=fed.loss_scaler)
                losses += step_losses
                if progress is not None:
                    progress(i + 1, steps)
        replies = self._exchange(grid, "train.upload", [gradients_to_records(g) for g in grads])
        adapters = [record_to_tensors(reply[ADAPTER], f"client {k}: adapter") for k, reply in enumerate(replies)]
        sizes = [int(reply[META]["num_examples"]) for reply in replies]
        global_adapter = fedavg(adapters, sizes) if K > 1 else adapters[0]
        if len(fed.servers) == K > 1:
            aggregate_and_broadcast(fed.servers, sizes)
        down = RecordDict({ADAPTER: tensors_to_record(global_adapter)})
        replies = self._exchange(grid, "train.broadcast", [down] * K)
        states: dict[str, Tensor] = {}
        for k, reply in enumerate(replies):
            states |= record_to_tensors(reply[STATE], f"client {k}: state")
        fed.load_state_dict(fed.state_dict() | states)  # validated: a client reports only its own keys
        return round_stats(round_index, losses, fed.hyper, K)


__all__ = ["FlowerSimulation", "LoadClient", "make_client_app"]
