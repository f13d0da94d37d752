"""The round loop of split federated LoRA fine-tuning (spec §1) and its baselines.

Modes (all on the same split model, data and seed; every mode processes ``K * I * b`` samples per round):

* ``"sfl"``: one round = I synchronous local iterations (each: K client forwards, one main-server
  pass over the K activations, K client backwards), then FedAvg of the K client adapters
  (and, with ``server_adapter="per_client"``, of the K server adapters) and broadcast.
* ``"centralized"``: all clients' data pooled, one model; a round is I AdamW steps on batches of
  K*b pooled samples, run through ``split.full`` (no cut).
* ``"fl"``: every client runs the whole model with its own client+server adapter for I steps of b
  samples; then FedAvg of all adapters.
* ``"sl"``: sequential split learning.  One round = the client adapter is relayed through clients
  0..K-1 in order; each runs I split iterations with the (single) main server before handing
  the adapter, together with its AdamW moments, to the next client.  The relay carries the
  optimizer state so that SL is plain sequential training over the clients' batches.

Each party draws its dropout masks from its own random stream seeded from ``(seed, party)``
(:mod:`sflllm.sfl.rng`), so the result does not depend on the order in which clients run.
Optimizers are AdamW per party (per client adapter, per server adapter); no gradient clipping
(global clipping would couple the parties and break the K=1 equivalence with centralized).
Client AdamW moments are local and are not averaged by FedAvg.  With a float16 base every mode trains
with one dynamic loss scale held by the main server (:mod:`sflllm.sfl.loss_scale`, GradScaler's
semantics: each party skips its own step on inf/nan, the scale backs off if any party did).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real
from typing import Literal, Protocol

import torch
from torch import Tensor

from sflllm.data import TokenizedExamples
from sflllm.model import SplitModel, lora_parameters, model_device
from sflllm.sfl.adapter import Adapter
from sflllm.sfl.batched import CLIENT_BATCHINGS, ClientBatching, check_batchable
from sflllm.sfl.client import ClientState, Cursor
from sflllm.sfl.federated_server import aggregate_and_broadcast
from sflllm.sfl.loss_scale import LossScaler, loss_scaling_applies
from sflllm.sfl.messages import CutSpec
from sflllm.sfl.precision import check_act_bits
from sflllm.sfl.protocol import full_model_step, split_iteration
from sflllm.sfl.rng import PartyRng

Mode = Literal["sfl", "centralized", "fl", "sl"]
MODES = ("sfl", "centralized", "fl", "sl")
SERVER_ADAPTERS = ("shared", "per_client")

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each local iteration of a round."""


@dataclass(frozen=True)
class Hyper:
    """Training hyper-parameters of the protocol (spec §1 names: I = local_steps, b = batch_size)."""

    mode: Mode = "sfl"
    local_steps: int = 1
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    server_adapter: Literal["shared", "per_client"] = "shared"
    act_bits: int = 32  # q_act: precision of activations and their gradients at the cut (sfl.precision)
    # execution only, the same result up to float rounding (tested): the K client passes one by one or
    # batched (sflllm.sfl.batched; "auto": batched where the client part draws no random numbers), and
    # the main server's batch in chunks of server_chunk clients (None: all K at once)
    client_batching: ClientBatching = "auto"
    server_chunk: int | None = None

    def __post_init__(self) -> None:
        check_act_bits(self.act_bits)
        if self.mode not in MODES:
            raise ValueError(f"Hyper.mode must be one of {MODES}, got {self.mode!r}")
        if self.server_adapter not in SERVER_ADAPTERS:
            raise ValueError(f"Hyper.server_adapter must be one of {SERVER_ADAPTERS}, got {self.server_adapter!r}")
        if self.server_adapter == "per_client" and self.mode != "sfl":
            raise ValueError(f"Hyper.server_adapter='per_client' applies to mode 'sfl' only, not {self.mode!r}")
        for name in ("local_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Hyper.{name} must be an integer >= 1, got {value!r}")
        if self.client_batching not in CLIENT_BATCHINGS:
            raise ValueError(f"Hyper.client_batching must be one of {CLIENT_BATCHINGS}, got {self.client_batching!r}")
        chunk = self.server_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"Hyper.server_chunk must be an integer >= 1 or None, got {chunk!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Hyper.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Hyper.{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("Hyper.lr must be > 0, got 0")


def pooled(client_data: list[TokenizedExamples]) -> TokenizedExamples:
    """All clients' rows concatenated in client order: the centralized baseline's data."""
    return TokenizedExamples(
        input_ids=torch.cat([d.input_ids for d in client_data]),
        attention_mask=torch.cat([d.attention_mask for d in client_data]),
        labels=torch.cat([d.labels for d in client_data]),
        mrs=tuple(mr for d in client_data for mr in d.mrs),
        refs=tuple(ref for d in client_data for ref in d.refs),
    )


def _check_client_data(client_data: list[TokenizedExamples]) -> None:
    if not client_data:
        raise ValueError("client_data must hold at least one client's TokenizedExamples")
    seq_len = None
    for k, data in enumerate(client_data):
        if not isinstance(data, TokenizedExamples):
            raise ValueError(f"client_data[{k}] must be TokenizedExamples (sflllm.data.tokenize), "
                             f"got {type(data).__name__}")
        rows, length = data.input_ids.shape  # TokenizedExamples checks its three tensors agree
        if rows == 0:
            raise ValueError(f"client_data[{k}] is empty; every client needs at least one example")
        if seq_len is not None and length != seq_len:
            raise ValueError(f"client_data[{k}] has seq_len {length}, client 0 has {seq_len}; "
                             "tokenize all clients with one seq_len")
        seq_len = length


class RoundEngine(Protocol):
    """What a training loop needs from an engine that runs the protocol: :class:`Federation` (in
    process) or ``sflllm.flower.FlowerSimulation``."""

    def run_round(self, round_index: int, progress: Progress | None = None) -> dict: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def load_global_adapter(self) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class Federation:
    """K simulated clients, a main server and a federated server around ONE frozen split model.

    Build with :func:`make_federation`.  Per party, the state is only LoRA tensors, AdamW state,
    a random stream and (for clients) a data cursor; the base model is shared by everyone.
    """

    def __init__(self, split: SplitModel, client_data: list[TokenizedExamples], hyper: Hyper) -> None:
        _check_client_data(client_data)
        self.split = split
        self.hyper = hyper
        self.num_clients = len(client_data)
        client_init = lora_parameters(split.client)
        server_init = lora_parameters(split.server)
        for part, init in (("client", client_init), ("server", server_init)):
            if not init:
                raise ValueError(f"split.{part} has no LoRA tensors: attach_lora (with targets in both parts) "
                                 "must run before split_model")
        # client and server parts name their blocks from 0 each, so map each part separately
        full_name = {id(p): name for name, p in split.full.named_parameters()}
        self._client_full_names = {name: full_name[id(p)] for name, p in client_init.items()}
        self._server_full_names = {name: full_name[id(p)] for name, p in server_init.items()}

        loss_scaling = loss_scaling_applies(split.full.dtype)

        def adapter(init: dict[str, Tensor]) -> Adapter:
            return Adapter(init, lr=hyper.lr, weight_decay=hyper.weight_decay, loss_scaling=loss_scaling)

        device = model_device(split.full)  # every party's tensors, batches and streams follow the model

        def client(k: int, data, adapter_k: Adapter, batch_size: int) -> ClientState:
            return ClientState(k, data, adapter_k, seed=hyper.seed, batch_size=batch_size, device=device)

        mode, K = hyper.mode, self.num_clients
        if mode == "centralized":
            self.clients = [client(0, pooled(client_data), adapter(client_init), K * hyper.batch_size)]
        elif mode == "sl":
            relay = adapter(client_init)
            self.clients = [client(k, d, relay, hyper.batch_size) for k, d in enumerate(client_data)]
        else:
            self.clients = [client(k, d, adapter(client_init), hyper.batch_size) for k, d in enumerate(client_data)]
        per_client_server = mode == "fl" or hyper.server_adapter == "per_client"
        self.servers = [adapter(server_init) for _ in range(K if per_client_server else 1)]
        self.server_rng = PartyRng(hyper.seed, "main_server", device)
        # the main server's dynamic loss scale (float16 base only; GradScaler's defaults)
        self.loss_scaler = LossScaler() if loss_scaling else None
        if mode == "sfl" and hyper.client_batching == "batched":
            check_batchable(split.client, list(client_init))  # refused now, not in the first round
        self.cut_spec = CutSpec(
            hidden_size=int(split.full.config.hidden_size),
            dtype=split.full.dtype,  # the base model's dtype: what the client blocks emit
            vocab_size=int(split.full.config.vocab_size),
            batch_size=hyper.batch_size,
            seq_len=int(client_data[0].input_ids.shape[1]),
            act_bits=hyper.act_bits,
        )

    # ---------------------------------------------------------------- parties
    @property
    def client_adapters(self) -> list[Adapter]:
        """The distinct client adapters (one in centralized and sl, K otherwise)."""
        return list({id(c.adapter): c.adapter for c in self.clients}.values())

    @property
    def data_sizes(self) -> list[int]:
        """D_k of each client (FedAvg weights)."""
        return [c.num_examples for c in self.clients]

    def full_model_lora(self, client: Adapter, server: Adapter) -> dict[str, Tensor]:
        """A client and a server adapter's tensors under the names of ``split.full``'s LoRA parameters."""
        lora = {self._client_full_names[n]: t for n, t in client.tensors.items()}
        return lora | {self._server_full_names[n]: t for n, t in server.tensors.items()}

    # ---------------------------------------------------------------- a round
    def run_round(self, round_index: int, progress: Progress | None = None) -> dict:
        """Run round ``round_index``: I local iterations, then aggregation and broadcast (spec §1).

        ``round_index`` is only reported back: the data order follows the clients' cursors, so a
        resumed federation needs nothing but its :meth:`state_dict`.
        Returns ``{"round", "train_loss", "samples", "local_steps"}``; ``train_loss`` is the mean
        over the round's iterations and clients of the per-batch LM loss.
        """
        losses = self.local_iterations(progress)
        self.aggregate()
        return round_stats(round_index, losses, self.hyper, self.num_clients)

    def local_iterations(self, progress: Progress | None = None) -> list[float]:
        """The training part of a round, without aggregation; returns every batch loss of the round.

        Runs in train mode, every party on its own random stream; the caller's RNG state and the
        model's train/eval mode are restored afterwards.
        """
        with training(self.split.full):
            return LOCAL_ITERATIONS[self.hyper.mode](self, progress)

    def aggregate(self) -> None:
        """Federated server: FedAvg (weights D_k) of the client adapters, and of the server adapters
        where there are K of them, then broadcast (spec §1).  A no-op for a single party."""
        if len(self.client_adapters) == self.num_clients > 1:
            aggregate_and_broadcast(self.client_adapters, self.data_sizes)
        if len(self.servers) == self.num_clients > 1:
            aggregate_and_broadcast(self.servers, self.data_sizes)

    # ---------------------------------------------------------------- the global adapter
    @torch.no_grad()
    def load_global_adapter(self) -> None:
        """Write the current global client and server adapters into ``split.full`` (e.g. to evaluate).

        After :meth:`run_round` every client (and server) adapter equals the broadcast global one.
        """
        for module, adapter in ((self.split.client, self.client_adapters[0]), (self.split.server, self.servers[0])):
            params = dict(module.named_parameters())
            for name, t in adapter.tensors.items():
                params[name].copy_(t)

    def start(self) -> None:
        """Nothing to start in process (the :class:`RoundEngine` interface)."""

    def close(self) -> None:
        """Nothing to release in process (the :class:`RoundEngine` interface)."""

    # ---------------------------------------------------------------- state
    def _live_state(self) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for k, adapter in enumerate(self.client_adapters):
            state |= adapter.live_state(f"client.{k}")
        for k, adapter in enumerate(self.servers):
            state |= adapter.live_state(f"server.{k}")
        return state

    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume bit-identically, as a flat dict of tensors (safetensors-safe):
        adapters, AdamW moments and step counts, data cursors ``(epoch, position)`` and every party's RNG state;
        with a float16 base also the loss scale and each adapter's last ``found_inf`` (:mod:`sflllm.sfl.loss_scale`)."""
        state = {name: t.detach().clone() for name, t in self._live_state().items()}
        for k, client in enumerate(self.clients):
            state |= stream_state(k, client)
        state["rng.main_server"] = self.server_rng.state.clone()
        if self.loss_scaler is not None:
            state |= self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a :meth:`state_dict`; raises ValueError naming the first missing, unexpected or
        mis-shaped/mis-typed key.  Nothing is changed unless the whole state validates."""
        check_state(state, self.state_dict(), "federation state")
        for k, client in enumerate(self.clients):
            check_cursor(state, k, client)
        check_found_inf(state, "federation state")
        if self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(state)  # validated first; changes nothing on error
        with torch.no_grad():
            for name, live in self._live_state().items():
                live.copy_(state[name])
        for k, client in enumerate(self.clients):
            load_stream_state(state, k, client)
        self.server_rng.state = state["rng.main_server"].clone()


# ---------------------------------------------------------------- one round's local iterations, per mode
def sfl_local_iterations(fed: Federation, progress: Progress | None) -> list[float]:
    """sfl: I synchronous split iterations of all K clients with the main server."""
    losses: list[float] = []
    for i in range(fed.hyper.local_steps):
        losses += split_iteration(fed.split.client, fed.split.server, fed.clients, fed.servers,
                                  fed.server_rng, fed.cut_spec, client_batching=fed.hyper.client_batching,
                                  server_chunk=fed.hyper.server_chunk, loss_scaler=fed.loss_scaler)
        _report(progress, i + 1, fed.hyper.local_steps)
    return losses


def sl_local_iterations(fed: Federation, progress: Progress | None) -> list[float]:
    """sl: clients 0..K-1 in turn, each I split iterations with the relayed client adapter."""
    steps, losses = fed.hyper.local_steps, []
    for k, client in enumerate(fed.clients):
        for i in range(steps):
            losses += split_iteration(fed.split.client, fed.split.server, [client], fed.servers,
                                      fed.server_rng, fed.cut_spec, loss_scaler=fed.loss_scaler)
            _report(progress, k * steps + i + 1, steps * fed.num_clients)
    return losses


def full_model_local_iterations(fed: Federation, progress: Progress | None) -> list[float]:
    """centralized (one pooled client) and fl: I whole-model steps per client, no cut.  With a float16
    base one loss scale serves every step of an iteration and is updated before the next from every
    adapter's ``found_inf``, as the main server does in sfl (:mod:`sflllm.sfl.loss_scale`)."""
    losses: list[float] = []
    for i in range(fed.hyper.local_steps):
        scale = 1.0
        if fed.loss_scaler is not None:
            scale = fed.loss_scaler.update([a.found_inf for a in fed.client_adapters + fed.servers])
        for client, server in zip(fed.clients, fed.servers, strict=True):
            lora = fed.full_model_lora(client.adapter, server)
            losses.append(full_model_step(fed.split.full, client, lora, [client.adapter, server], loss_scale=scale))
        _report(progress, i + 1, fed.hyper.local_steps)
    return losses


LOCAL_ITERATIONS: dict[str, Callable[[Federation, Progress | None], list[float]]] = {
    "sfl": sfl_local_iterations,
    "sl": sl_local_iterations,
    "centralized": full_model_local_iterations,
    "fl": full_model_local_iterations,
}
"""The training part of one round, per mode: one interface, one function per mode."""


def round_stats(round_index: int, losses: list[float], hyper: Hyper, num_clients: int) -> dict:
    """What a round reports: ``{"round", "train_loss", "samples", "local_steps"}``; ``train_loss`` is the
    mean of the round's per-batch LM losses (iterations and clients)."""
    return {
        "round": round_index,
        "train_loss": sum(losses) / len(losses),
        "samples": hyper.local_steps * hyper.batch_size * num_clients,
        "local_steps": hyper.local_steps,
    }


@contextmanager
def training(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in train mode (dropout on); every module's mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def check_state(state: Mapping[str, object], expected: Mapping[str, Tensor], what: str) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped/mis-typed key of ``state``
    (``what`` names the state in the message) against the tensors ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{what} is missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"{what} has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for name, ref in expected.items():
        got = state[name]
        if not isinstance(got, Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
            desc = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got).__name__
            raise ValueError(f"{what} key {name!r}: expected {tuple(ref.shape)} {ref.dtype}, got {desc}")


def stream_state(k: int, client: ClientState) -> dict[str, Tensor]:
    """Client k's data cursor ``(epoch, position)`` and RNG state, under their :meth:`Federation.state_dict` names."""
    return {
        f"cursor.{k}": torch.tensor([client.cursor.epoch, client.cursor.position], dtype=torch.int64),
        f"rng.client.{k}": client.rng.state.clone(),
    }


def client_state(k: int, client: ClientState) -> dict[str, Tensor]:
    """Everything client k holds (copies): adapter, AdamW state, cursor, RNG; its part of the
    :meth:`Federation.state_dict` of modes with one adapter per client (sfl, fl)."""
    state = {name: t.detach().clone() for name, t in client.adapter.live_state(f"client.{k}").items()}
    return state | stream_state(k, client)


def check_found_inf(state: Mapping[str, Tensor], what: str) -> None:
    """ValueError naming the first ``*.found_inf`` key of ``state`` that holds neither 0 nor 1."""
    for name, t in state.items():
        if name.endswith(".found_inf") and float(t.item()) not in (0.0, 1.0):
            raise ValueError(f"{what} key {name!r}: {float(t.item())!r} is not 0 or 1")


def check_cursor(state: Mapping[str, Tensor], k: int, client: ClientState) -> None:
    epoch, position = (int(v) for v in state[f"cursor.{k}"])
    if epoch < 0 or not 0 <= position < client.num_examples:
        raise ValueError(f"federation state key 'cursor.{k}': invalid cursor (epoch {epoch}, "
                         f"position {position}) for {client.num_examples} examples")


def load_stream_state(state: Mapping[str, Tensor], k: int, client: ClientState) -> None:
    epoch, position = (int(v) for v in state[f"cursor.{k}"])
    client.cursor = Cursor(epoch, position)
    client.rng.state = state[f"rng.client.{k}"].clone()


def load_client_state(state: Mapping[str, Tensor], k: int, client: ClientState) -> None:
    """Restore :func:`client_state` into ``client`` (validated first: nothing changes on error)."""
    check_state(state, client_state(k, client), f"client {k} state")
    check_cursor(state, k, client)
    check_found_inf(state, f"client {k} state")
    with torch.no_grad():
        for name, live in client.adapter.live_state(f"client.{k}").items():
            live.copy_(state[name])
    load_stream_state(state, k, client)


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def make_federation(split: SplitModel, client_data: list[TokenizedExamples], hyper: Hyper) -> Federation:
    """Set up K clients (one per ``client_data`` entry), the main server and the federated server.

    Every party starts from the adapters currently in ``split`` (the broadcast initial adapter).
    """
    return Federation(split, client_data, hyper)


__all__ = ["LOCAL_ITERATIONS", "Federation", "Hyper", "RoundEngine", "check_state", "client_state", "load_client_state", "make_federation", "round_stats", "training"]
