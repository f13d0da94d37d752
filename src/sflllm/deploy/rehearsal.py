"""A one-process rehearsal of a deployment: every cut exchange over the gRPC data plane on 127.0.0.1.

:class:`DataPlaneRehearsal` has the round interface of :class:`~sflllm.sfl.Federation`
(:class:`~sflllm.sfl.RoundEngine`), so ``sflllm train --engine dataplane`` runs it: the main
server listens with TLS (a throw-away self-signed certificate) and checks a fresh per-run token;
each client runs its rounds in a thread of this process and talks to the main server over gRPC
only.  The result equals ``--engine local`` (tested); a client that fails or times out is dropped
from its round and the round's metrics say so (:func:`~sflllm.deploy.federated_round`).
"""

from __future__ import annotations

import secrets
import threading

from torch import Tensor

from sflllm.deploy.dataplane import DataPlaneClient, MainServerPlane, serve
from sflllm.deploy.rounds import federated_round, main_server_plane
from sflllm.deploy.tls import self_signed_certificate
from sflllm.sfl import Federation
from sflllm.sfl.federation import Progress


class DataPlaneRehearsal:
    """``federation`` (mode sfl) run over the data plane; ``client_timeout`` (s): how long the main
    server waits for a client's activations once another client's have arrived."""

    def __init__(self, federation: Federation, *, client_timeout: float = 60.0, host: str = "127.0.0.1") -> None:
        if federation.hyper.mode != "sfl":
            raise ValueError(f"the data plane runs mode 'sfl', not {federation.hyper.mode!r}")
        self.federation = federation
        self.client_timeout = client_timeout
        self.host = host
        self._lock = threading.Lock()  # the parties share torch's global RNG in one process
        self._server = None
        self._plane: MainServerPlane | None = None
        self._clients: list[DataPlaneClient] = []
        self._busy: dict[int, threading.Thread] = {}  # dropped clients' threads that may still run

    def start(self) -> None:
        """Make the certificate and token, start the main server's gRPC server and connect the clients; idempotent."""
        if self._server is not None:
            return
        fed = self.federation
        certificate, private_key = self_signed_certificate((self.host,))
        token = secrets.token_urlsafe(32)
        self._plane = main_server_plane(fed, token, client_timeout=self.client_timeout, compute_lock=self._lock)
        self._server, port = serve(self._plane, f"{self.host}:0", certificate, private_key)
        self._clients = [DataPlaneClient(f"{self.host}:{port}", certificate, token, k, fed.cut_spec,
                                         timeout=self.client_timeout + 600)
                         for k in range(fed.num_clients)]

    def run_round(self, round_index: int, progress: Progress | None = None) -> dict:
        """One round over the data plane; Federation.run_round's report plus ``"dropped"``.  ``progress``
        is called once, at the end of the round's local iterations (the clients run concurrently)."""
        self.start()
        assert self._plane is not None
        stats = federated_round(self.federation, self._plane, self._clients, round_index, compute_lock=self._lock,
                                busy=self._busy)
        if progress is not None:
            progress(self.federation.hyper.local_steps, self.federation.hyper.local_steps)
        return stats

    def state_dict(self) -> dict[str, Tensor]:
        return self.federation.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.federation.load_state_dict(state)

    def load_global_adapter(self) -> None:
        self.federation.load_global_adapter()

    def close(self) -> None:
        """Close the clients' channels and stop the main server (a no-op when never started)."""
        for client in self._clients:
            client.close()
        self._clients = []
        if self._server is not None:
            self._server.stop(grace=5).wait(10)
        self._server, self._plane = None, None
