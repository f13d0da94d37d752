"""E2E evaluation: generate one sentence per unique MR and score it against all references of that MR.

The scores are :func:`sflllm.metrics.score_e2e`'s: BLEU, NIST, METEOR, ROUGE-L and CIDEr as the
official E2E NLG Challenge scorer computes them (BLEU, METEOR, ROUGE-L x100).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sflllm.data import Example, eos_token_id, normalize_whitespace, pad_token_id, prompt_ids
from sflllm.metrics import score_e2e
from sflllm.model import max_positions


def group_references(examples: Sequence[Example]) -> tuple[list[str], list[list[str]]]:
    """Unique MRs in first-appearance order, and the list of references of each MR."""
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example.mr, []).append(example.ref)
    return list(groups), list(groups.values())


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    mrs: Sequence[str],
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """One generated sentence per MR: greedy (``num_beams=1``) or beam search with HF ``generate``.

    ``length_penalty`` (beam search only: scores are divided by length**length_penalty) and
    ``no_repeat_ngram_size`` (0: off) are HF ``generate``'s; LoRA's E2E setup is ``num_beams=10,
    length_penalty=0.8, no_repeat_ngram_size=4``.

    The prompt is the training prompt (:func:`sflllm.data.prompt_ids`), left-padded within each
    batch; only the new tokens are decoded, up to the first EOS, whitespace-normalised. The model is
    put in eval mode for the call and its previous mode restored.
    """
    for field, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if not mrs:
        return []
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    prompts = prompt_ids(tokenizer, mrs)
    limit = max_positions(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions; lower max_new_tokens"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                attention_mask[i, width - len(p) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in output[:, width:].tolist():
                new_tokens = row[: row.index(eos)] if eos in row else row
                texts.append(normalize_whitespace(tokenizer.decode(new_tokens, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return texts


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    meteor: bool = True,
) -> tuple[dict, list[str], list[str], list[list[str]]]:
    """Generate for each unique MR of ``examples`` and score (:func:`sflllm.metrics.score_e2e`):
    ``(metrics, mrs, hypotheses, references)``; ``metrics["decoding"]`` states the decoding settings."""
    mrs, references = group_references(examples)
    decoding = {
        "num_beams": num_beams,
        "length_penalty": length_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
    }
    hypotheses = generate_texts(
        model, tokenizer, mrs, num_beams=num_beams, length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens, batch_size=batch_size,
    )  # fmt: skip
    metrics = {**score_e2e(hypotheses, references, meteor=meteor), "decoding": decoding}
    return metrics, mrs, hypotheses, references
