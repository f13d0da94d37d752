"""The data plane of a deployment: each local iteration's cut exchange (spec §1) over gRPC.

Client k sends its :class:`~sflllm.sfl.CutActivations` to the main server and gets back its
:class:`~sflllm.sfl.CutGradients`, in one unary call ``/sflllm.DataPlane/Exchange``.  The main
server (:class:`MainServerPlane`) waits until every client of the round has sent iteration i (or
until ``client_timeout`` has passed since the first one did, dropping the clients that did not),
runs the public :func:`~sflllm.sfl.main_server_step` over the payloads in client order and answers
each client with its gradient.

Security and validation:

* TLS (server certificate) on every connection; the client checks the server against its root
  certificate.
* A per-run token, which the client presents in the call's metadata (``sflllm-token``); a missing
  or wrong token is refused (``UNAUTHENTICATED``) before the payload is read.
* Tensors travel as safetensors bytes (a JSON header that declares each tensor's dtype and shape,
  then the raw bytes): nothing is pickled, and truncated or inconsistent bytes do not decode.  On
  receipt the fields must be exactly those of the payload and the protocol's checks
  (:func:`~sflllm.sfl.check_activations` against the :class:`~sflllm.sfl.CutSpec`,
  ``check_gradients``) judge dtypes, shapes and values.  gRPC's message-size limits are set from
  the model and the batch (:func:`activation_limit`, :func:`gradient_limit`), so an oversized
  message is refused before it is buffered.
* A refused message is logged (logger ``sflllm.deploy``) and answered with an error status; the
  server keeps serving.

``grpcio`` comes with the ``flower`` extra; it is imported when a server or client is built.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from sflllm.sfl import (
    ACTIVATION_FIELDS,
    GRADIENT_FIELDS,
    Adapter,
    CutActivations,
    CutGradients,
    CutSpec,
    LossScaler,
    PartyRng,
    check_activations,
    main_server_step,
)

LOG = logging.getLogger("sflllm.deploy")

SERVICE = "sflllm.DataPlane"
EXCHANGE = f"/{SERVICE}/Exchange"
TOKEN_KEY = "sflllm-token"
CLIENT_KEY = "sflllm-client"
ROUND_KEY = "sflllm-round"
ITERATION_KEY = "sflllm-iteration"
HEADER_BYTES = 4096
"""Room for a payload's safetensors header (JSON with each field's name, dtype, shape and offsets:
under 400 bytes for the four activation fields) and the one-value fields (``found_inf``, ``loss_scale``:
9 bytes); 4 KiB leaves ample margin."""


class DataPlaneError(RuntimeError):
    """A call over the data plane failed; ``code`` is the gRPC status name (e.g. ``UNAUTHENTICATED``)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- wire format
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def encode(tensors: dict[str, Tensor]) -> bytes:
    """The safetensors bytes of ``tensors`` (dtype, shape and raw bytes of each; no pickle).

    Written here in the safetensors layout (8-byte little-endian header length, JSON header with each
    tensor's dtype, shape and byte offsets, padded with spaces to 8 bytes, then the raw bytes, widest
    dtype first so every tensor stays aligned) with one copy of each tensor's bytes:
    ``safetensors.torch.save`` copies them twice, 4 ms more per 3 MB message (measured).  The
    receiver parses them with ``safetensors.torch.load`` (:func:`decode`); a test checks that both
    give the same tensors.
    """
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(flat, key=lambda n: (-flat[n].element_size(), n)):
        t = flat[name]
        data = t.reshape(-1).view(torch.uint8).numpy()  # a view: no copy yet
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return b"".join([len(head).to_bytes(8, "little"), head, *chunks])


def decode(data: bytes, fields: Sequence[str], what: str) -> dict[str, Tensor]:
    """The tensors in safetensors bytes ``data``, which must hold exactly ``fields``; ValueError
    naming ``what`` on bytes that do not decode (truncated, inconsistent header) or other fields."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own error type on any malformed input
        raise ValueError(f"{what}: not a valid safetensors payload ({len(data)} bytes): {err}") from None
    if sorted(tensors) != sorted(fields):
        raise ValueError(f"{what}: fields {sorted(tensors)}, expected {sorted(fields)}")
    return tensors


def encode_activations(cut: CutActivations) -> bytes:
    return encode(cut.to_tensors())


def decode_activations(data: bytes, sender: str) -> CutActivations:
    """The CutActivations in ``data`` (decoded; :func:`~sflllm.sfl.check_activations` judges them)."""
    what = f"{sender}: CutActivations"
    return CutActivations.from_tensors(decode(data, ACTIVATION_FIELDS, what), what)


def encode_gradients(grads: CutGradients) -> bytes:
    return encode(grads.to_tensors())


def decode_gradients(data: bytes, sender: str = "main server") -> CutGradients:
    what = f"{sender}: CutGradients"
    return CutGradients.from_tensors(decode(data, GRADIENT_FIELDS, what), what)


def _rows_and_length(spec: CutSpec) -> tuple[int, int]:
    if spec.batch_size is None or spec.seq_len is None:
        raise ValueError("the data plane's size limits need CutSpec.batch_size and CutSpec.seq_len")
    return spec.batch_size, spec.seq_len


def gradient_limit(spec: CutSpec) -> int:
    """The largest gradient message, in bytes: b * s * hidden_size values of the cut dtype, plus header."""
    rows, length = _rows_and_length(spec)
    return rows * length * spec.hidden_size * spec.dtype.itemsize + HEADER_BYTES


def activation_limit(spec: CutSpec) -> int:
    """The largest activation message, in bytes: the hidden states plus int64 attention mask and labels."""
    rows, length = _rows_and_length(spec)
    return gradient_limit(spec) + 2 * rows * length * torch.int64.itemsize


# ---------------------------------------------------------------- main server
@dataclass
class _Iteration:
    """One local iteration at the main server: the payloads received so far and, once run, the answers."""

    started: float
    cuts: dict[int, CutActivations] = field(default_factory=dict)
    grads: dict[int, CutGradients] | None = None
    error: str | None = None


@dataclass(frozen=True)
class RoundReport:
    """What the main server saw in a round: every batch loss (iteration by iteration, client order)
    and the clients dropped, with why."""

    losses: list[float]
    dropped: dict[int, str]


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class MainServerPlane:
    """The main server's end of the data plane: a barrier per local iteration around
    :func:`~sflllm.sfl.main_server_step`.

    ``adapters`` are the server adapters (one shared, or one per client, indexed by client).
    ``client_timeout`` (seconds): how long after the first payload of an iteration the others may
    take before their clients are dropped from the round.  ``compute_lock``, when given, is held
    while the main server computes (a one-process rehearsal shares torch's global RNG between
    parties, see :mod:`sflllm.sfl.rng`).  ``max_clients`` bounds a round's clients: each one waiting
    at the barrier holds one of the gRPC server's worker threads (:func:`serve` makes enough).
    ``loss_scaler`` is the main server's loss scale, for a float16 cut (:func:`~sflllm.sfl.main_server_step`).
    """

    def __init__(self, server_module: torch.nn.Module, adapters: Sequence[Adapter], rng: PartyRng, spec: CutSpec,
                 token: str, *, client_timeout: float = 30.0,
                 compute_lock: AbstractContextManager[Any] | None = None, max_clients: int = 64,
                 server_chunk: int | None = None, loss_scaler: LossScaler | None = None) -> None:
        if not token:
            raise ValueError("the data plane needs a non-empty per-run token")
        if not (client_timeout > 0 and math.isfinite(client_timeout)):
            raise ValueError(f"client_timeout must be a positive number of seconds, got {client_timeout!r}")
        _rows_and_length(spec)
        self.server_module = server_module
        self.adapters = list(adapters)
        self.rng = rng
        self.spec = spec
        self.client_timeout = client_timeout
        self.max_clients = max_clients
        self.server_chunk = server_chunk
        self.loss_scaler = loss_scaler
        self._token = token.encode("utf-8")
        self._compute_lock = compute_lock if compute_lock is not None else nullcontext()
        self._cond = threading.Condition()
        self._round: int | None = None
        self._local_steps = 0
        self._active: set[int] = set()
        self._dropped: dict[int, str] = {}
        self._iterations: dict[int, _Iteration] = {}
        self._losses: dict[int, list[float]] = {}

    # ------------------------------------------------------------ round control (the federated server's side)
    def begin_round(self, round_index: int, clients: Sequence[int], local_steps: int) -> None:
        """Open round ``round_index`` for ``clients`` (indices), each to run ``local_steps`` iterations."""
        if len(clients) > self.max_clients:
            raise ValueError(f"{len(clients)} clients in a round, more than max_clients={self.max_clients}")
        if len(self.adapters) > 1 and any(not 0 <= k < len(self.adapters) for k in clients):
            raise ValueError(f"clients {sorted(clients)} do not all have a server adapter "
                             f"({len(self.adapters)} per-client adapters)")
        with self._cond:
            self._round, self._local_steps = round_index, local_steps
            self._active, self._dropped = set(clients), {}
            self._iterations, self._losses = {}, {}

    def drop(self, client: int, reason: str, round_index: int) -> None:
        """Drop ``client`` from round ``round_index`` (no-op if that round is over or the client is not
        active in it); iterations waiting for it go on without it."""
        with self._cond:
            if round_index == self._round:
                self._drop({client} & self._active, reason)

    def wait_round(self, timeout: float | None = None) -> bool:
        """Wait until the main server has served (or failed) every local iteration of the round for
        the clients still in it, or every client has been dropped; False if ``timeout`` (s) passed
        first (e.g. every remaining client stopped before sending)."""
        def served() -> bool:
            done = (self._iterations.get(i) for i in range(self._local_steps))
            return not self._active or all(it is not None and (it.grads, it.error) != (None, None) for it in done)

        with self._cond:
            return self._cond.wait_for(served, timeout)

    def end_round(self) -> RoundReport:
        """Close the round; what it saw."""
        with self._cond:
            losses = [loss for i in sorted(self._losses) for loss in self._losses[i]]
            report = RoundReport(losses, dict(self._dropped))
            self._round, self._active, self._iterations = None, set(), {}
            return report

    @property
    def dropped(self) -> dict[int, str]:
        with self._cond:
            return dict(self._dropped)

    def _drop(self, clients: set[int], reason: str) -> None:
        for k in sorted(clients):
            LOG.warning("round %s: client %d dropped: %s", self._round, k, reason)
            self._dropped[k] = reason
        self._active -= clients
        self._cond.notify_all()

    # ------------------------------------------------------------ the gRPC handler
    def exchange(self, request: bytes, context: Any) -> bytes:
        """``/sflllm.DataPlane/Exchange``: activations in, gradients out; a refused call is logged
        and aborted with a status that says why."""
        import grpc

        try:
            return self._exchange(request, dict(context.invocation_metadata()))
        except _Refused as refused:
            LOG.warning("data plane refused a call from %s: %s: %s", context.peer(), refused.code, refused)
            context.abort(getattr(grpc.StatusCode, refused.code), str(refused))
            raise AssertionError("unreachable: context.abort raises") from None

    def _exchange(self, request: bytes, metadata: dict[str, Any]) -> bytes:
        token = metadata.get(TOKEN_KEY)
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), self._token):
            raise _Refused("UNAUTHENTICATED", "missing or wrong data-plane token (metadata 'sflllm-token')")
        try:
            client, round_index, iteration = (int(metadata[key]) for key in (CLIENT_KEY, ROUND_KEY, ITERATION_KEY))
        except (KeyError, TypeError, ValueError):
            raise _Refused("INVALID_ARGUMENT", f"metadata must carry integer {CLIENT_KEY}, {ROUND_KEY} and "
                                               f"{ITERATION_KEY}") from None
        sender = f"client {client}"
        try:
            cut = check_activations(decode_activations(request, sender), self.spec, sender=sender)
        except ValueError as err:
            raise _Refused("INVALID_ARGUMENT", str(err)) from None
        with self._cond:
            if round_index != self._round:
                raise _Refused("FAILED_PRECONDITION", f"{sender}: round {round_index} is not open "
                                                      f"(open: {self._round})")
            if client in self._dropped:
                raise _Refused("FAILED_PRECONDITION", f"{sender} was dropped from round {round_index}: "
                                                      f"{self._dropped[client]}")
            if client not in self._active:
                raise _Refused("PERMISSION_DENIED", f"{sender} is not in round {round_index}")
            if not 0 <= iteration < self._local_steps:
                raise _Refused("INVALID_ARGUMENT", f"{sender}: iteration {iteration} outside "
                                                   f"0..{self._local_steps - 1}")
            it = self._iterations.setdefault(iteration, _Iteration(time.monotonic()))
            if it.grads is not None or client in it.cuts:
                raise _Refused("ALREADY_EXISTS", f"{sender}: iteration {iteration} was already sent")
            it.cuts[client] = cut
            self._cond.notify_all()
            self._wait_and_serve(iteration, it)
            if it.error is not None:
                raise _Refused("INTERNAL", f"main server failed on iteration {iteration}: {it.error}")
            if client not in it.grads:
                raise _Refused("FAILED_PRECONDITION", f"{sender} was dropped from round {round_index}: "
                                                      f"{self._dropped.get(client, 'dropped')}")
            return encode_gradients(it.grads[client])

    def _wait_and_serve(self, iteration: int, it: _Iteration) -> None:
        """Called holding the lock: wait until every active client has sent ``iteration`` (or drop
        the late ones after ``client_timeout``), then run the main server's step once."""
        while it.grads is None and it.error is None:
            missing = self._active - set(it.cuts)
            if not missing:
                self._serve(iteration, it)
                break
            remaining = it.started + self.client_timeout - time.monotonic()
            if remaining <= 0:
                self._drop(missing, f"no activations for iteration {iteration} within {self.client_timeout:g} s")
            else:
                self._cond.wait(remaining)

    def _serve(self, iteration: int, it: _Iteration) -> None:
        clients = sorted(k for k in it.cuts if k in self._active)
        adapters = self.adapters if len(self.adapters) == 1 else [self.adapters[k] for k in clients]
        try:
            with self._compute_lock:
                losses, grads = main_server_step(self.server_module, adapters, self.rng,
                                                 [it.cuts[k] for k in clients], self.spec,
                                                 server_chunk=self.server_chunk, loss_scaler=self.loss_scaler)
        except Exception as err:  # reported to every waiting client, and the server keeps serving
            LOG.exception("main server step failed on iteration %d", iteration)
            it.error = f"{type(err).__name__}: {err}"
        else:
            it.grads = dict(zip(clients, grads, strict=True))
            self._losses[iteration] = losses
        it.cuts = {}
        self._cond.notify_all()


def serve(plane: MainServerPlane, address: str, certificate: bytes, private_key: bytes) -> tuple[Any, int]:
    """Start a TLS gRPC server for ``plane`` on ``address`` (``host:port``; port 0 picks a free one).

    Returns ``(server, port)``; stop it with ``server.stop(grace)`` (a grace period in seconds lets the
    answers of a round that :meth:`MainServerPlane.wait_round` saw served go out).  Its receive limit is
    :func:`activation_limit` of the plane's cut spec.
    """
    import grpc

    limit = activation_limit(plane.spec)
    options = [("grpc.max_receive_message_length", limit),
               ("grpc.max_send_message_length", gradient_limit(plane.spec))]
    # every client of a round holds one worker at the barrier; leave room for refused calls
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=plane.max_clients + 8), options=options)
    handler = grpc.unary_unary_rpc_method_handler(plane.exchange)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Exchange": handler}),))
    port = server.add_secure_port(address, grpc.ssl_server_credentials([(private_key, certificate)]))
    if port == 0:
        raise OSError(f"data plane: cannot listen on {address}")
    server.start()
    LOG.info("data plane listening on port %d (TLS), limit %d bytes per message", port, limit)
    return server, port


# ---------------------------------------------------------------- client
class DataPlaneClient:
    """Client k's end of the data plane: a TLS channel to the main server at ``address``.

    ``root_certificate`` (PEM) is what the server's certificate must chain to; ``token`` the per-run
    token; ``timeout`` (seconds) bounds one exchange (it includes waiting for the other clients).
    """

    def __init__(self, address: str, root_certificate: bytes, token: str, client: int, spec: CutSpec, *,
                 timeout: float = 120.0) -> None:
        import grpc

        self._grpc = grpc
        self.address = address
        self.spec = spec
        self.client = client
        self.timeout = timeout
        self._token = token
        options = [("grpc.max_send_message_length", activation_limit(spec)),
                   ("grpc.max_receive_message_length", gradient_limit(spec))]
        self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificate), options)
        self._call = self._channel.unary_unary(EXCHANGE)

    def exchange(self, cut: CutActivations, round_index: int, iteration: int) -> CutGradients:
        """Send this client's activations of ``iteration`` and return the main server's gradients;
        :class:`DataPlaneError` if the call fails or the answer does not decode."""
        metadata = ((TOKEN_KEY, self._token), (CLIENT_KEY, str(self.client)), (ROUND_KEY, str(round_index)),
                    (ITERATION_KEY, str(iteration)))
        try:
            reply = self._call(encode_activations(cut), timeout=self.timeout, metadata=metadata)
        except self._grpc.RpcError as err:
            raise DataPlaneError(f"client {self.client}, round {round_index}, iteration {iteration}: "
                                 f"{err.code().name}: {err.details()}", err.code().name) from None
        try:
            return decode_gradients(reply)
        except ValueError as err:
            raise DataPlaneError(str(err), "INVALID_ARGUMENT") from None

    def close(self) -> None:
        self._channel.close()
