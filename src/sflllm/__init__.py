"""sflllm: split federated LoRA fine-tuning of large language models over communication networks.

Two halves that share a vocabulary (split_layer, rank, local_steps, main server, federated server):

* the SFL engine (``sflllm.model``, ``sflllm.sfl``, ``sflllm.data``) that trains, and
* the cost model and optimiser (``sflllm.cost``, ``sflllm.network``, ``sflllm.allocation``), which
  imports no torch, so that ``sflllm optimize`` starts fast.
"""

__version__ = "0.1.0"
