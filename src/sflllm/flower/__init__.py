"""Flower runtimes of the SFL protocol (the ``flower`` extra: ``pip install "sflllm[flower]"``).

``FlowerSimulation`` runs :mod:`sflllm.sfl.protocol` in Flower's Simulation Engine
(``sflllm train --engine flower-sim``); ``FlowerDeployment`` runs it with SuperLink and SuperNodes
as separate processes, the cut exchanges over the gRPC data plane (:mod:`sflllm.flower.deployment`).
Importing this package imports ``flwr``; the simulation's names (and Ray with them) are imported on
first use, so that a deployed ClientApp process does not pay for Ray.  The rest of sflllm imports
Flower only when a Flower engine is asked for.
"""

from typing import Any

from sflllm.flower.records import (
    activations_to_records,
    gradients_to_records,
    record_to_tensors,
    records_to_activations,
    records_to_gradients,
    tensors_to_record,
)

_SIMULATION = ("FlowerSimulation", "LoadClient", "make_client_app")
_DEPLOYMENT = ("DeploymentSettings", "FlowerDeployment", "LoadFederation", "make_deployment_client_app")


def __getattr__(name: str) -> Any:
    if name in _SIMULATION:
        from sflllm.flower import simulation

        return getattr(simulation, name)
    if name in _DEPLOYMENT:
        from sflllm.flower import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'sflllm.flower' has no attribute {name!r}")


__all__ = [
    *_DEPLOYMENT,
    *_SIMULATION,
    "activations_to_records",
    "gradients_to_records",
    "record_to_tensors",
    "records_to_activations",
    "records_to_gradients",
    "tensors_to_record",
]
