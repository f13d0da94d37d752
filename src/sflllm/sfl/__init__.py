"""The split federated LoRA protocol (spec §1): clients, main server, federated server, round loop.

Modes ``sfl`` (the protocol), ``centralized``, ``fl`` and ``sl`` (baselines) share one frozen model.
The protocol's steps (:mod:`sflllm.sfl.protocol`) exchange only the typed cut payloads of
:mod:`sflllm.sfl.messages`, so any runtime (in-process, Flower) can drive them.
"""

from sflllm.sfl.adapter import Adapter, step_adapters
from sflllm.sfl.batched import (
    CLIENT_BATCHINGS,
    ClientBatching,
    GroupedLoRA,
    batched_backward,
    batched_forward,
    batching_applies,
)
from sflllm.sfl.client import Batch, ClientState, Cursor
from sflllm.sfl.federated_server import aggregate_and_broadcast, fedavg
from sflllm.sfl.federation import LOCAL_ITERATIONS, Federation, Hyper, RoundEngine, make_federation
from sflllm.sfl.loss_scale import LossScaler, ScaleState, loss_scaling_applies, updated_scale
from sflllm.sfl.precision import ACT_BITS, quantize_cut
from sflllm.sfl.messages import (
    ACTIVATION_FIELDS,
    GRADIENT_FIELDS,
    CutActivations,
    CutGradients,
    CutSpec,
    check_activations,
    check_gradients,
)
from sflllm.sfl.protocol import (
    PendingBackward,
    client_step_backward,
    client_step_forward,
    full_model_step,
    main_server_step,
    recompute_forward,
    split_iteration,
)
from sflllm.sfl.rng import PartyRng, party_seed

__all__ = [
    "ACTIVATION_FIELDS",
    "ACT_BITS",
    "CLIENT_BATCHINGS",
    "LOCAL_ITERATIONS",
    "Adapter",
    "Batch",
    "ClientBatching",
    "ClientState",
    "Cursor",
    "CutActivations",
    "CutGradients",
    "CutSpec",
    "Federation",
    "GRADIENT_FIELDS",
    "GroupedLoRA",
    "Hyper",
    "LossScaler",
    "PartyRng",
    "PendingBackward",
    "RoundEngine",
    "ScaleState",
    "aggregate_and_broadcast",
    "batched_backward",
    "batched_forward",
    "batching_applies",
    "check_activations",
    "check_gradients",
    "client_step_backward",
    "client_step_forward",
    "fedavg",
    "loss_scaling_applies",
    "full_model_step",
    "main_server_step",
    "make_federation",
    "party_seed",
    "quantize_cut",
    "recompute_forward",
    "split_iteration",
    "step_adapters",
    "updated_scale",
]
