"""Running the SFL protocol across processes and machines (the ``flower`` extra provides grpcio).

The data plane (:mod:`sflllm.deploy.dataplane`) carries each local iteration's cut payloads
between a client and the main server over gRPC with TLS and a per-run token;
:mod:`sflllm.deploy.rounds` runs a round over it, dropping clients that fail or time out.
grpcio is imported only when a server or client is built.
"""

from sflllm.deploy.dataplane import (
    DataPlaneClient,
    DataPlaneError,
    MainServerPlane,
    RoundReport,
    activation_limit,
    decode_activations,
    decode_gradients,
    encode_activations,
    encode_gradients,
    gradient_limit,
    serve,
)
from sflllm.deploy.rehearsal import DataPlaneRehearsal
from sflllm.deploy.rounds import broadcast_average, client_round, close_round, federated_round, main_server_plane
from sflllm.deploy.tls import self_signed_certificate

__all__ = [
    "DataPlaneClient",
    "DataPlaneError",
    "DataPlaneRehearsal",
    "MainServerPlane",
    "RoundReport",
    "activation_limit",
    "broadcast_average",
    "client_round",
    "close_round",
    "decode_activations",
    "decode_gradients",
    "encode_activations",
    "encode_gradients",
    "federated_round",
    "gradient_limit",
    "main_server_plane",
    "self_signed_certificate",
    "serve",
]
