"""E2E evaluation: generate one sentence per unique MR and score it against all references of that MR.

Metrics (the E2E NLG Challenge set, computed offline):

- ``bleu``: sacrebleu ``corpus_bleu`` with multiple references (0-100, case-sensitive, 13a tokens).
- ``rouge_l``: rouge-score ROUGE-L F1; for each hypothesis the max F1 over its references
  (``RougeScorer.score_multi``), averaged over hypotheses (0-1).
- ``nist``: nltk ``corpus_nist`` (n=5) on sacrebleu 13a tokens (0 for orders no hypothesis reaches).
- ``meteor``: nltk ``meteor_score``, averaged; only when nltk's WordNet data is installed.
- ``cider``: pycocoevalcap ``Cider`` (pure Python, no Java) on lowercased 13a tokens; only when
  pycocoevalcap is installed.

A metric that cannot be computed is left out and a line in ``notes`` says why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nltk.corpus import wordnet
from nltk.translate.meteor_score import meteor_score
from nltk.translate.nist_score import corpus_nist
from rouge_score import rouge_scorer
from sacrebleu import corpus_bleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sflllm.data import Example, eos_token_id, normalize_whitespace, pad_token_id, prompt_ids
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
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """One generated sentence per MR: greedy (``num_beams=1``) or beam search with HF ``generate``.

    The prompt is the training prompt (:func:`sflllm.data.prompt_ids`), left-padded within each
    batch; only the new tokens are decoded, up to the first EOS, whitespace-normalised. The model is
    put in eval mode for the call and its previous mode restored.
    """
    for field, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}")
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


def _wordnet_available() -> bool:
    """Whether nltk's WordNet corpus (needed by METEOR's synonym matching) can be loaded offline."""
    try:
        wordnet.ensure_loaded()
    except LookupError:
        return False
    return True


def _tokens(text: str, tokenizer: Tokenizer13a) -> list[str]:
    return tokenizer(text).split()


def text_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus metrics of ``hypotheses[i]`` against its references ``references[i]`` (see module doc).

    Returns ``{"bleu", "rouge_l", "nist", ["meteor"], ["cider"], "num_hypotheses", "notes"}``
    (JSON-serialisable). Raises ``ValueError`` on a length mismatch or an MR without references.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    notes: list[str] = []
    # sacrebleu takes reference streams; a hypothesis with fewer references has None in the rest.
    num_streams = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(num_streams)]
    metrics: dict = {"bleu": float(corpus_bleu(list(hypotheses), streams).score)}

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    metrics["rouge_l"] = float(
        sum(scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references))
        / len(hypotheses)
    )

    tok13a = Tokenizer13a()
    hyp_tokens = [_tokens(h, tok13a) for h in hypotheses]
    ref_tokens = [[_tokens(r, tok13a) for r in refs] for refs in references]
    # nltk divides by the number of hypothesis n-grams of each order, which is 0 for orders longer
    # than every hypothesis; mteval-v13a scores such an order 0, which is the same as stopping at
    # the longest hypothesis. All hypotheses empty -> the length penalty is 0, so NIST is 0.
    longest = max(len(h) for h in hyp_tokens)
    metrics["nist"] = float(corpus_nist(ref_tokens, hyp_tokens, n=min(5, longest))) if longest else 0.0

    if _wordnet_available():
        metrics["meteor"] = float(
            sum(meteor_score(refs, hyp) for hyp, refs in zip(hyp_tokens, ref_tokens)) / len(hypotheses)
        )
    else:
        notes.append("meteor omitted: nltk's WordNet data is not installed (nltk.download('wordnet'))")

    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        notes.append("cider omitted: pycocoevalcap is not installed (pip install pycocoevalcap)")
    else:
        gts = {i: [" ".join(r).lower() for r in refs] for i, refs in enumerate(ref_tokens)}
        res = {i: [" ".join(h).lower()] for i, h in enumerate(hyp_tokens)}
        metrics["cider"] = float(Cider().compute_score(gts, res)[0])

    metrics["num_hypotheses"] = len(hypotheses)
    metrics["notes"] = notes
    return metrics


def evaluate_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> tuple[dict, list[str], list[str]]:
    """Generate for each unique MR of ``examples`` and score: ``(metrics, mrs, hypotheses)``."""
    mrs, references = group_references(examples)
    hypotheses = generate_texts(
        model, tokenizer, mrs, num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return text_metrics(hypotheses, references), mrs, hypotheses
