"""BLEU and NIST as the official E2E NLG Challenge scorer computes them.

The papers that report E2E numbers (LoRA, SplitLoRA, SflLLM) ran e2e-metrics' ``measure_scores.py
-p``: BLEU and NIST from its Python port of NIST's ``mteval-v13a.pl`` (``pymteval``). This module
computes the same numbers:

- tokens: mteval-v13a's "basic" tokenisation (:func:`mteval_tokenize`), then lowercased: the scorer
  is case-insensitive;
- an n-gram of a hypothesis counts as a hit at most as often as it occurs in one reference of its MR
  (the most frequent reference, "clipping");
- BLEU (n <= 4): corpus precisions, geometric mean; brevity penalty ``exp(1 - r / c)`` when
  ``c <= r``, with ``r`` the summed length of each hypothesis's closest reference (ties: the
  shorter). Precisions are floored (hits at 1e-15, counts at 1e-9) as pymteval does, so BLEU is never
  undefined; a corpus without any matching 4-gram scores a few 1e-5, not exactly 0;
- NIST (n <= 5): information weights ``log2(count(w1..wn-1) / count(w1..wn))`` counted over *all*
  references of the corpus (the 0-gram count is the number of reference words); the weighted hits
  of each order divided by the hypotheses' n-gram count of that order, summed over orders; length
  penalty ``exp(-beta ln^2(c / r))`` for ``c < r``, with ``r`` the sum over MRs of the *average*
  reference length and ``beta = -ln 0.5 / ln^2 1.5`` (mteval's: penalty 0.5 at 2/3 of the length).

One deliberate difference, for degenerate hypotheses only: pymteval counts ``len - n + 1`` n-grams
of order n even when that is negative, and tokenises an empty hypothesis as one empty token; here a
hypothesis of ``len < n`` tokens has no n-grams of order n and an empty one has no tokens (what
mteval-v13a.pl does). The two agree whenever every hypothesis has at least 3 tokens (BLEU) / 4
tokens (NIST), as every real E2E output does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["bleu", "mteval_tokenize", "nist", "nist_length_penalty"]

BLEU_MAX_N = 4
NIST_MAX_N = 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_BLEU_TINY_HITS = 1e-15  # pymteval's floors that keep BLEU defined when an order has no hit / no n-gram
_BLEU_SMALL_COUNT = 1e-9
_BLEU_EMPTY_LENGTH = 1e-5  # brevity penalty of an empty corpus: c stands in as 1e-5 (BLEU -> 0)

# mteval-v13a "basic" tokenisation, in order (language-independent part, then the Western-language one)
_UNESCAPE = (("<skipped>", ""), ("-\n", ""), ("\n", " "), ("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
_PUNCTUATION = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")  # ASCII punctuation except . , ' -
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")  # . , split off unless preceded by a digit
_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")  # ... unless followed by a digit
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's tokens of ``text``, lowercased (``"Café, 5."`` -> ``["café", ",", "5", "."]``)."""
    for old, new in _UNESCAPE:
        text = text.replace(old, new)
    text = _PUNCTUATION.sub(r" \1 ", f" {text} ")
    text = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    return [token.lower() for token in text.split()]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _clipped_hits(hypothesis: Counter[tuple[str, ...]], references: Sequence[Counter[tuple[str, ...]]]) -> Counter[tuple[str, ...]]:
    """Each n-gram of ``hypothesis`` with its count clipped to its largest count in one reference (0s dropped)."""
    most: Counter[tuple[str, ...]] = Counter()
    for reference in references:
        most |= reference
    return hypothesis & most


def _tokenized(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    return [mteval_tokenize(h) for h in hypotheses], [[mteval_tokenize(r) for r in refs] for refs in references]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = BLEU_MAX_N) -> float:
    """Corpus BLEU (0-1) of ``hypotheses[i]`` against the references ``references[i]`` (module doc)."""
    hyps, refs = _tokenized(hypotheses, references)
    hits, counts, closest_length = [0] * max_n, [0] * max_n, 0
    for hyp, hyp_refs in zip(hyps, refs):
        for n in range(1, max_n + 1):
            hits[n - 1] += sum(_clipped_hits(_ngrams(hyp, n), [_ngrams(r, n) for r in hyp_refs]).values())
            counts[n - 1] += max(len(hyp) - n + 1, 0)
        closest_length += min((abs(len(r) - len(hyp)), len(r)) for r in hyp_refs)[1]
    log_precision = sum(
        math.log(max(h, _BLEU_TINY_HITS) / max(c, _BLEU_SMALL_COUNT)) for h, c in zip(hits, counts)
    ) / max_n
    length = counts[0]
    brevity = 1.0 if length > closest_length else math.exp(1.0 - closest_length / (length or _BLEU_EMPTY_LENGTH))
    return brevity * math.exp(log_precision)


def nist_length_penalty(length: int, reference_length: float) -> float:
    """mteval's NIST brevity factor: 1 for ``length >= reference_length``, ``exp(-beta ln^2 ratio)`` below."""
    ratio = length / reference_length
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = NIST_MAX_N) -> float:
    """Corpus NIST of ``hypotheses[i]`` against the references ``references[i]`` (module doc)."""
    hyps, refs = _tokenized(hypotheses, references)
    if any(len(r) == 0 for hyp_refs in refs for r in hyp_refs):
        raise ValueError("NIST needs non-empty references")
    reference_counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(max_n + 1)]  # [0]: the 0-gram ()
    hits: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(max_n)]  # summed over hypotheses
    counts = [0] * max_n
    average_reference_length = 0.0
    for hyp, hyp_refs in zip(hyps, refs):
        for n in range(1, max_n + 1):
            ref_ngrams = [_ngrams(r, n) for r in hyp_refs]
            hits[n - 1].update(_clipped_hits(_ngrams(hyp, n), ref_ngrams))
            counts[n - 1] += max(len(hyp) - n + 1, 0)
            for ngrams in ref_ngrams:
                reference_counts[n].update(ngrams)
        words = sum(len(r) for r in hyp_refs)
        reference_counts[0][()] += words
        average_reference_length += words / len(hyp_refs)

    def information(ngram: tuple[str, ...]) -> float:
        return math.log2(reference_counts[len(ngram) - 1][ngram[:-1]] / reference_counts[len(ngram)][ngram])

    score = sum(
        sum(information(g) * k for g, k in hits[n].items()) / counts[n] for n in range(max_n) if counts[n]
    )
    return nist_length_penalty(counts[0], average_reference_length) * score
