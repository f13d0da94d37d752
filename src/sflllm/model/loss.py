"""Next-token cross-entropy of a causal LM, as Hugging Face computes it (labels shifted inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the summed next-token cross-entropy (B,) and its number of target tokens (B,).

    ``logits`` (B, S, V) and ``labels`` (B, S) are aligned with ``input_ids``: position t's logits
    predict ``labels[:, t + 1]``; labels equal to -100 are ignored. Logits are upcast to float32 like
    Hugging Face's ``ForCausalLMLoss``. The shift moves the labels, not the logits (the last position
    gets no target), so the (B, S, V) logits are neither copied nor sliced (whose backward would
    allocate and fill a second (B, S, V) gradient).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, S, V) and labels (B, S) with the same B, S; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.view(labels.shape).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens it sums over
    (:func:`lm_loss_rows` summed over the batch). Returns ``(sum, count)`` so that callers can
    weight means over several batches by token count.
    """
    totals, counts = lm_loss_rows(logits, labels)
    return totals.sum(), counts.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels != -100), shifted inside.

    Raises ValueError when the batch has no target token (the mean would be undefined).
    """
    total, count = lm_loss_sum(logits, labels)
    if int(count) == 0:
        raise ValueError("labels has no target token (every shifted label is -100); the mean loss is undefined")
    return total / count


def lm_loss_groups(logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The mean next-token cross-entropy of each group of consecutive rows (group k: ``sizes[k]`` rows),
    shape (len(sizes),): :func:`lm_loss` of each group, from one cross-entropy over the whole batch.

    Raises ValueError when ``sizes`` does not add up to the batch or a group has no target token.
    """
    if sum(sizes) != labels.shape[0] or min(sizes, default=0) < 1:
        raise ValueError(f"group sizes {sizes} must be >= 1 and add up to the batch's {labels.shape[0]} rows")
    totals, counts = lm_loss_rows(logits, labels)
    group = torch.repeat_interleave(torch.arange(len(sizes), device=labels.device),
                                    torch.tensor(sizes, device=labels.device))
    totals = totals.new_zeros(len(sizes)).index_add(0, group, totals)
    counts = counts.new_zeros(len(sizes)).index_add(0, group, counts)
    empty = (counts == 0).nonzero()
    if len(empty):
        raise ValueError(f"labels of group {int(empty[0])} have no target token (every shifted label is -100); "
                         "its mean loss is undefined")
    return totals / counts
