"""Next-token cross-entropy of a causal LM, as Hugging Face computes it (labels shifted inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens it sums over.

    ``logits`` (B, S, V) and ``labels`` (B, S) are aligned with ``input_ids``: position t's logits
    predict ``labels[:, t + 1]``; labels equal to -100 are ignored. Logits are upcast to float32 like
    Hugging Face's ``ForCausalLMLoss``. Returns ``(sum, count)`` so that callers can weight means over
    several batches by token count.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, S, V) and labels (B, S) with the same B, S; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    targets = labels[:, 1:].reshape(-1)
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    total = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels != -100), shifted inside.

    Raises ValueError when the batch has no target token (the mean would be undefined).
    """
    total, count = lm_loss_sum(logits, labels)
    if int(count) == 0:
        raise ValueError("labels has no target token (every shifted label is -100); the mean loss is undefined")
    return total / count
