"""The SFL protocol (spec §1) in a Flower deployment: SuperLink and SuperNodes as separate processes.

A deployed Flower message costs seconds (flwr 1.42 starts a ClientApp process per message and polls),
so a round is **one Flower message per client**, and the per-iteration cut exchange runs over the
gRPC data plane (:mod:`sflllm.deploy`) between each client and the main server:

* down (``train``): the global client adapter (ArrayRecord), the round's configuration (ConfigRecord:
  round index, the run's TrainConfig as JSON, the data plane's address, its root certificate and the
  per-run token, the data plane's timeout) and, when the client's node does not hold its current
  state (the run's first round, a resumed run, a client dropped from the last round), the client's
  whole state from the main server's checkpoint copy (ArrayRecord);
* the ClientApp rebuilds its part of the split model and its data partition from the config (its
  node's ``partition-id``), restores its state (from the message, else from ``context.state``, which
  holds it in records between rounds), runs :func:`~sflllm.deploy.client_round` (I local
  iterations ``client_step_forward`` -> data plane -> ``client_step_backward``), keeps its state
  (adapter, AdamW moments, cursor, RNG) in ``context.state`` and replies;
* up: its adapter, its whole state (the main server keeps it as the checkpoint copy that
  ``sflllm train``'s state.safetensors holds, so a restarted main server can resume) and D_k.

The batch losses are the main server's (it computes them).  The federated server then averages the
adapters of the clients that completed the round (FedAvg, weights D_k renormalised over them:
:func:`~sflllm.deploy.close_round`); a client that failed, timed out or whose node is offline is
dropped from the round (listed in the round's metrics) and gets its state again when it is back.
The data plane's certificate and token reach the clients only inside the Flower message, which
travels over SuperLink's TLS to authenticated SuperNodes.

Every received record is decoded with :func:`~sflllm.flower.records.record_to_tensors` (dtype
allow-list, byte count = shape x itemsize) and checked against the tensors the receiver expects
(names, shapes, dtypes) before anything is changed; nothing is pickled.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from torch import Tensor

from sflllm.deploy import (
    DataPlaneClient,
    MainServerPlane,
    client_round,
    close_round,
    main_server_plane,
    self_signed_certificate,
    serve,
)
from sflllm.flower.records import ADAPTER, META, STATE, error_line, record_to_tensors, tensors_to_record
from sflllm.sfl import Federation
from sflllm.sfl.federation import Progress, check_state, client_state, load_client_state, training

LOG = logging.getLogger("sflllm.deploy")

ROUND = "round"  # the ConfigRecord of a round message
TRAIN = "train"  # message type of a round
HELLO = "query.hello"  # message type asking a node which client it is
POLL_S = 0.2  # how often the federated server pulls replies

LoadFederation = Callable[[str], Federation]
"""``load_federation(config_json) -> federation``: the run rebuilt from its TrainConfig JSON in the
ClientApp's process (the ClientApp uses ``split.client``, its own client and the ``cut_spec``)."""


# --------------------------------------------------------------------------- the messages
@dataclass(frozen=True)
class RoundTask:
    """What the one Flower message of a round tells client k."""

    round_index: int
    config_json: str  # the run's TrainConfig
    address: str  # the main server's data plane, host:port
    root_certificate: bytes  # PEM the data plane's certificate chains to
    token: str  # the per-run data-plane token
    timeout: float  # seconds one data-plane exchange may take
    adapter: dict[str, Tensor]  # the global client adapter
    state: dict[str, Tensor] | None = None  # client k's whole state, when its node does not hold it


_TASK_FIELDS: dict[str, type] = {"round": int, "config": str, "address": str, "root-certificate": bytes,
                                 "token": str, "timeout": float}


def task_content(task: RoundTask) -> RecordDict:
    content = RecordDict({
        ROUND: ConfigRecord({"round": task.round_index, "config": task.config_json, "address": task.address,
                             "root-certificate": task.root_certificate, "token": task.token,
                             "timeout": float(task.timeout)}),
        ADAPTER: tensors_to_record(task.adapter),
    })
    if task.state is not None:
        content[STATE] = tensors_to_record(task.state)
    return content


def read_task(content: RecordDict, what: str = "round message") -> RoundTask:
    """The RoundTask in a round message; ValueError naming ``what`` and the field on a missing
    record, a field of the wrong type or a tensor that does not decode (the receiver then checks
    the tensors against its own)."""
    record = content.get(ROUND) if ROUND in content else None
    if not isinstance(record, ConfigRecord):
        raise ValueError(f"{what}: no {ROUND!r} ConfigRecord")
    values = {}
    for name, kind in _TASK_FIELDS.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{what}: {ROUND}.{name} must be {kind.__name__}, got {type(value).__name__}")
        values[name] = value
    if values["round"] < 0 or not (values["timeout"] > 0 and math.isfinite(values["timeout"])):
        raise ValueError(f"{what}: {ROUND}.round must be >= 0 and {ROUND}.timeout a positive number of seconds")
    if ADAPTER not in content:
        raise ValueError(f"{what}: no {ADAPTER!r} record (the global client adapter)")
    adapter = record_to_tensors(content[ADAPTER], f"{what}: global adapter")
    state = record_to_tensors(content[STATE], f"{what}: client state") if STATE in content else None
    return RoundTask(values["round"], values["config"], values["address"], values["root-certificate"],
                     values["token"], values["timeout"], adapter, state)


@dataclass(frozen=True)
class RoundReply:
    """What client k sends back at the end of its round."""

    adapter: dict[str, Tensor]
    state: dict[str, Tensor]  # client_state(k, client): adapter, AdamW moments, cursor, RNG
    num_examples: int  # D_k


def reply_content(reply: RoundReply) -> RecordDict:
    return RecordDict({ADAPTER: tensors_to_record(reply.adapter), STATE: tensors_to_record(reply.state),
                       META: MetricRecord({"num_examples": reply.num_examples})})


def read_reply(content: RecordDict, k: int, fed: Federation) -> RoundReply:
    """Client k's RoundReply, checked against client k of ``fed`` (names, shapes, dtypes; a cursor
    inside its data; D_k equal to its partition's size); ValueError naming the client and field."""
    what = f"client {k}: reply"
    for key in (ADAPTER, STATE, META):
        if key not in content:
            raise ValueError(f"{what}: no {key!r} record")
    client = fed.clients[k]
    adapter = record_to_tensors(content[ADAPTER], f"{what}: adapter")
    check_state(adapter, client.adapter.tensors, f"{what}: adapter")
    state = record_to_tensors(content[STATE], f"{what}: state")
    check_state(state, client_state(k, client), f"{what}: state")
    meta = content[META]
    size = meta.get("num_examples") if isinstance(meta, MetricRecord) else None
    if not isinstance(size, int) or isinstance(size, bool) or size != client.num_examples:
        raise ValueError(f"{what}: {META}.num_examples is {size!r}, expected {client.num_examples} (D_k)")
    if not all(torch.equal(state[f"client.{k}.lora.{name}"], t) for name, t in adapter.items()):
        raise ValueError(f"{what}: the adapter differs from the adapter in its state")
    return RoundReply(adapter, state, size)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) of this SuperNode's ``--node-config``; ValueError if absent or bad."""
    try:
        k, n = (int(context.node_config[key]) for key in ("partition-id", "num-partitions"))
    except (KeyError, TypeError, ValueError):
        raise ValueError("the SuperNode needs --node-config 'partition-id=K num-partitions=N' (integers)") from None
    if not 0 <= k < n:
        raise ValueError(f"node config: partition-id {k} outside 0..{n - 1}")
    return k, n


# --------------------------------------------------------------------------- the clients
def make_deployment_client_app(load_federation: LoadFederation) -> ClientApp:
    """The ClientApp of a deployment: client k = its node's ``partition-id``; see the module docstring."""
    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        k, n = node_partition(context)
        return Message(RecordDict({META: MetricRecord({"client": k, "clients": n})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        k, n = node_partition(context)
        task = read_task(msg.content, f"round message to client {k}")
        fed = load_federation(task.config_json)
        if n != fed.num_clients:
            raise ValueError(f"node config: num-partitions {n}, but the run has {fed.num_clients} clients")
        client, module = fed.clients[k], fed.split.client
        if task.state is not None:
            load_client_state(task.state, k, client)
        elif STATE in context.state:
            load_client_state(record_to_tensors(context.state[STATE], f"client {k}: kept state"), k, client)
        else:
            raise ValueError(f"client {k}: the round message carries no state and this node keeps none")
        check_state(task.adapter, client.adapter.tensors, f"round message to client {k}: global adapter")
        client.adapter.assign(task.adapter)
        plane = DataPlaneClient(task.address, task.root_certificate, task.token, k, fed.cut_spec, timeout=task.timeout)
        try:
            with training(module):
                client_round(module, client, plane, task.round_index, fed.hyper.local_steps)
        finally:
            plane.close()
        state = client_state(k, client)
        context.state[STATE] = tensors_to_record(state)
        return Message(reply_content(RoundReply(client.adapter.tensors, state, client.num_examples)), reply_to=msg)

    return app


# --------------------------------------------------------------------------- the main and federated server
@dataclass(frozen=True)
class DeploymentSettings:
    """How the ServerApp runs the data plane and waits for clients.

    ``bind``: where the main server's data plane listens (port 0: one the OS picks); ``host``: the
    address the clients dial (and the name in the throw-away certificate); ``certificate``,
    ``private_key``, ``root_certificate`` (PEM): the data plane's TLS material (None: a throw-away
    self-signed certificate, which is its own root); ``client_timeout`` (s): how long the main server
    waits for a client's activations once another client's have arrived; ``round_timeout`` (s): the
    longest a round may take before the clients that have not replied are dropped;
    ``ready_timeout`` (s): how long to wait for the K SuperNodes at the start.
    """

    bind: str = "127.0.0.1:0"
    host: str = "127.0.0.1"
    certificate: bytes | None = None
    private_key: bytes | None = None
    root_certificate: bytes | None = None
    client_timeout: float = 60.0
    round_timeout: float = 3600.0
    ready_timeout: float = 300.0


class FlowerDeployment:
    """The SFL protocol over Flower deployment messages and the data plane, with the round interface
    of :class:`~sflllm.sfl.Federation` (:class:`~sflllm.sfl.RoundEngine`), run inside a ServerApp.

    ``federation`` is the ServerApp's side: its split model's server part, server adapters and main
    server RNG are the main server's (live); its clients are the checkpoint copy of every client's
    state, refreshed from the replies at the end of each round (:meth:`state_dict`) and sent to a
    client whose node does not hold it (so :meth:`load_state_dict` resumes a run).
    """

    def __init__(self, federation: Federation, grid: Grid, config_json: str,
                 settings: DeploymentSettings | None = None) -> None:
        if federation.hyper.mode != "sfl":
            raise ValueError(f"engine flower-deployment runs mode 'sfl' only, not {federation.hyper.mode!r}")
        self.federation = federation
        self.grid = grid
        self.config_json = config_json
        self.settings = settings or DeploymentSettings()
        self._server: Any = None
        self._plane: MainServerPlane | None = None
        self._address = ""
        self._root = b""
        self._token = ""
        self._nodes: dict[int, int] = {}  # client k -> its SuperNode's id
        self._synced: set[int] = set()  # clients whose node keeps their current state (this run)

    @property
    def num_clients(self) -> int:
        return self.federation.num_clients

    # ------------------------------------------------------------ start and stop
    def start(self) -> None:
        """Start the main server's data plane and wait until every client's SuperNode has said which
        client it is (at most ``ready_timeout``); idempotent."""
        if self._server is not None:
            return
        fed, s = self.federation, self.settings
        if s.certificate is None or s.private_key is None:
            certificate, private_key = self_signed_certificate((s.host,))
            root = certificate
        else:
            certificate, private_key, root = s.certificate, s.private_key, s.root_certificate or s.certificate
        self._token = secrets.token_urlsafe(32)
        self._plane = main_server_plane(fed, self._token, client_timeout=s.client_timeout)
        self._server, port = serve(self._plane, s.bind, certificate, private_key)
        self._address, self._root = f"{s.host}:{port}", root
        deadline = time.monotonic() + s.ready_timeout
        while len(self._nodes) < self.num_clients:
            self._discover(deadline)
            if len(self._nodes) < self.num_clients:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.num_clients)) - set(self._nodes))
                    raise RuntimeError(f"no SuperNode for clients {missing} within {s.ready_timeout:.0f} s")
                time.sleep(1.0)

    def close(self) -> None:
        """Stop the data plane (a no-op when never started)."""
        if self._server is not None:
            self._server.stop(grace=5).wait(10)
        self._server, self._plane = None, None

    def _discover(self, deadline: float) -> None:
        """Ask the online nodes not yet mapped which client they are (one query each)."""
        known = set(self._nodes.values())
        new = [node for node in self.grid.get_node_ids() if node not in known]
        if not new:
            return
        replies = self._exchange([Message(RecordDict(), dst_node_id=node, message_type=HELLO) for node in new],
                                 deadline)
        for node, reply in replies.items():
            if reply.has_error():
                LOG.info("SuperNode %d did not say which client it is (yet): %s", node, error_line(reply.error.reason))
                continue
            meta = reply.content.get(META)
            k, n = (meta.get(key) if isinstance(meta, MetricRecord) else None for key in ("client", "clients"))
            if n != self.num_clients or not isinstance(k, int) or not 0 <= k < self.num_clients:
                raise RuntimeError(f"SuperNode {node} is client {k!r} of {n!r}; this run has {self.num_clients} "
                                   "clients (check its --node-config partition-id and num-partitions)")
            if k in self._nodes and self._nodes[k] != node:
                raise RuntimeError(f"SuperNodes {self._nodes[k]} and {node} both say they are client {k}")
            self._nodes[k] = node

    def _exchange(self, messages: Iterable[Message], deadline: float) -> dict[int, Message]:
        """Push ``messages``; their replies by node, pulled until all came or ``deadline`` (monotonic) passed."""
        ids = list(self.grid.push_messages(messages))
        replies: dict[int, Message] = {}
        while len(replies) < len(ids) and time.monotonic() < deadline:
            for reply in self.grid.pull_messages([i for i in ids if i]):
                replies[reply.metadata.src_node_id] = reply
            if len(replies) < len(ids):
                time.sleep(POLL_S)
        return replies

    # ------------------------------------------------------------ a round
    def run_round(self, round_index: int, progress: Progress | None = None) -> dict:
        """One round: a message to every client, I local iterations over the data plane, FedAvg over
        the clients that completed it; Federation.run_round's report plus ``"dropped"``."""
        self.start()
        assert self._plane is not None
        fed, s = self.federation, self.settings
        deadline = time.monotonic() + s.round_timeout
        self._discover(deadline)
        online = set(self.grid.get_node_ids())
        dropped = {k: "its SuperNode is offline" for k in range(self.num_clients)
                   if self._nodes.get(k) not in online}
        taking_part = [k for k in range(self.num_clients) if k not in dropped]
        self._plane.begin_round(round_index, taking_part, fed.hyper.local_steps)
        global_adapter = fed.clients[0].adapter.tensors  # every client holds it after a broadcast
        messages = [Message(task_content(RoundTask(
            round_index, self.config_json, self._address, self._root, self._token,
            s.client_timeout + s.round_timeout, global_adapter,
            None if k in self._synced else client_state(k, fed.clients[k]))),
            dst_node_id=self._nodes[k], message_type=TRAIN, ttl=s.round_timeout) for k in taking_part]
        client_of = {self._nodes[k]: k for k in taking_part}
        plane = self._plane

        def settled() -> bool:  # every client still in the round has replied or been dropped
            return all(k in replied or k in plane.dropped for k in taking_part)

        replied: set[int] = set()
        replies: dict[int, Message] = {}
        with training(fed.split.server):
            ids = list(self.grid.push_messages(messages))
            while not settled() and time.monotonic() < deadline:
                for reply in self.grid.pull_messages(ids):
                    k = client_of.get(reply.metadata.src_node_id)
                    if k is None:
                        continue
                    replies[k] = reply
                    replied.add(k)
                    if reply.has_error():
                        plane.drop(k, f"its ClientApp failed: {error_line(reply.error.reason)}", round_index)
                if not settled():
                    time.sleep(POLL_S)
            for k in taking_part:
                if k not in replied:
                    plane.drop(k, f"no reply within round_timeout={s.round_timeout:g} s", round_index)
            report = plane.end_round()
        dropped |= report.dropped
        survivors = []
        for k in taking_part:
            if k in dropped:
                continue
            try:
                reply = read_reply(replies[k].content, k, fed)
                load_client_state(reply.state, k, fed.clients[k])
            except ValueError as err:
                LOG.warning("round %d: client %d dropped: %s", round_index, k, err)
                dropped[k] = str(err)
                continue
            survivors.append(k)  # read_reply checked its D_k against the run's
        stats = close_round(fed, round_index, report.losses, survivors, dropped)
        # a survivor's node keeps its state (with the pre-average adapter, which the next message
        # replaces); a dropped client's node may hold anything: it gets its state again
        self._synced = set(survivors)
        if progress is not None:
            progress(fed.hyper.local_steps, fed.hyper.local_steps)
        return stats

    # ------------------------------------------------------------ state (the checkpoint copy)
    def state_dict(self) -> dict[str, Tensor]:
        return self.federation.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.federation.load_state_dict(state)
        self._synced = set()

    def load_global_adapter(self) -> None:
        self.federation.load_global_adapter()


__all__ = ["DeploymentSettings", "FlowerDeployment", "LoadFederation", "RoundReply", "RoundTask",
           "make_deployment_client_app", "node_partition", "read_reply", "read_task", "reply_content",
           "task_content"]
