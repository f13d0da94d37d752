"""The split federated LoRA protocol (spec §1): clients, main server, federated server, round loop.

Modes ``sfl`` (the protocol), ``centralized``, ``fl`` and ``sl`` (baselines) share one frozen model.
"""

from sflllm.sfl.federated_server import fedavg
from sflllm.sfl.federation import Federation, Hyper, make_federation
from sflllm.sfl.precision import ACT_BITS, quantize_cut

__all__ = ["ACT_BITS", "Federation", "Hyper", "fedavg", "make_federation", "quantize_cut"]
