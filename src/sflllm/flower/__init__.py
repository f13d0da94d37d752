"""Flower runtimes of the SFL protocol (the ``flower`` extra: ``pip install "sflllm[flower]"``).

``FlowerSimulation`` runs :mod:`sflllm.sfl.protocol` in Flower's Simulation Engine
(``sflllm train --engine flower-sim``).  Importing this package imports ``flwr``; the rest of
sflllm imports it only when a Flower engine is asked for.
"""

from sflllm.flower.records import (
    activations_to_records,
    gradients_to_records,
    record_to_tensors,
    records_to_activations,
    records_to_gradients,
    tensors_to_record,
)
from sflllm.flower.simulation import FlowerSimulation, LoadClient, make_client_app

__all__ = [
    "FlowerSimulation",
    "LoadClient",
    "activations_to_records",
    "gradients_to_records",
    "make_client_app",
    "record_to_tensors",
    "records_to_activations",
    "records_to_gradients",
    "tensors_to_record",
]
