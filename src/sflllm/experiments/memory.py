"""Peak memory of a training run, estimated before it starts, and the check against available memory.

``sflllm train --rank 100000`` or ``--batch-size 100000`` on stories260K used to be accepted and
then killed by the OOM killer at about 24 GB. :func:`check_memory` refuses such a run before any
round, naming the estimate and what to lower (``--force`` overrides it).

The estimate counts, in float32 bytes (spec §7's per-token activation term, widened to what
PyTorch actually keeps alive for the backward pass, and with the main server's logits):

* the frozen base model (its parameters);
* every party's LoRA tensors with their gradients and two AdamW moments (4 copies);
* the tokenised data (three int64 tensors of ``seq_len`` per example);
* the activations alive at the peak of one local iteration: the tokens processed together
  (``K b s`` in ``sfl`` and ``centralized``, whose main server sees every client's batch at once;
  ``b s`` in ``fl`` and ``sl``, which run one client at a time) times, per token, every block's
  saved tensors (1.8 times the input and output widths of its linear layers, for their inputs,
  outputs, norms, residuals and activation functions; the LoRA intermediates) and the logits
  (several copies of the vocabulary row: logits, log-probabilities, their gradient). The
  ``s x s`` attention scores are not counted: PyTorch's scaled-dot-product attention does not keep
  them (measured: adding them overestimated stories260K's peak 4x).

It is within 30% of measured peaks (peak RSS growth of a child process over one round,
``tests/test_memory_estimate.py``, which checks 0.7x to 1.3x on both models); the factor 1.8 was
fitted to: demo model (GPT-2, d = 128, 4 blocks) b = 64: 1,293 MB measured; stories260K (Llama,
d = 64, 5 blocks) at seq_len 260, b = 64: 2,071 to 2,179 MB measured. With factor 2 the estimate
was an upper bound on both (1.04x demo, 1.28x to 1.35x stories260K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sflllm.cost.profile import ModelProfile

FLOAT_BYTES = 4
INDEX_BYTES = 8
TORCH_WORKSPACE_BYTES = 64 * 2**20  # autograd engine, thread pools and allocator slack on a first step
SAVED_PER_BLOCK_WIDTHS = 1.8  # floats kept per token and block per unit of linear width (d_in + d_out), measured
LOGIT_COPIES = 4  # logits, log-probabilities, their gradient and the loss's temporary


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part; ``total`` is the estimated peak of the run (the base model included)."""

    model: int
    adapters: int
    data: int
    activations: int

    @property
    def total(self) -> int:
        return self.model + self.adapters + self.data + self.activations + TORCH_WORKSPACE_BYTES


def estimate_peak_memory(
    model: torch.nn.Module,
    profile: ModelProfile,
    *,
    mode: str,
    clients: int,
    batch_size: int,
    seq_len: int,
    rank: int,
    examples: int,
) -> MemoryEstimate:
    """The peak memory of training ``model`` (float32) as the module docstring counts it."""
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lora_per_copy = profile.num_layers * rank * profile.lora_width * FLOAT_BYTES
    parties = 1 if mode in ("centralized", "sl") else clients  # client adapters
    adapters = (parties + clients) * lora_per_copy * 4  # + up to K server adapters; param, grad, 2 moments
    data = examples * seq_len * 3 * INDEX_BYTES
    tokens = (clients if mode in ("sfl", "centralized") else 1) * batch_size * seq_len
    linear_width = sum(layer.d_in + layer.d_out for layer in profile.linears)
    per_block = SAVED_PER_BLOCK_WIDTHS * linear_width + 2 * rank * len(profile.lora_targets)
    per_token = profile.num_layers * per_block + LOGIT_COPIES * profile.vocab_size
    return MemoryEstimate(model_bytes, adapters, data, int(tokens * per_token * FLOAT_BYTES))


def available_memory() -> int:
    """Bytes the system can still give this process (``psutil.virtual_memory().available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def memory_advice(estimate: MemoryEstimate, available: int) -> str | None:
    """None when ``estimate`` fits in ``available`` bytes, else a one-line refusal naming what to lower."""
    if estimate.total <= available:
        return None
    parts = {"activations (lower --batch-size, --seq-len or --clients)": estimate.activations,
             "LoRA state (lower --rank)": estimate.adapters,
             "tokenised data (lower --train-samples or --seq-len)": estimate.data,
             "base model": estimate.model}
    largest = max(parts, key=parts.__getitem__)
    return (f"peak memory estimate {_gib(estimate.total)} exceeds the {_gib(available)} available; "
            f"largest part: {largest} {_gib(parts[largest])}; pass --force to train anyway")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
