"""E2E NLG metrics as the official E2E NLG Challenge scorer computes them (no torch).

``score_e2e`` gives BLEU, NIST, METEOR, ROUGE-L and CIDEr equal to e2e-metrics' ``measure_scores.py
-p`` (the scorer the LoRA, SplitLoRA and SflLLM papers report); ``read_e2e_files`` and the
``format_*`` functions read and write its plain-text hypothesis and reference files.
"""

from sflllm.metrics.coco import (
    PTB_PUNCTUATION,
    MeteorScorer,
    MetricsError,
    cider,
    coco_tokenize,
    java_executable,
    ptb_tokenize,
    ptb_tokenize_approx,
    rouge_l,
)
from sflllm.metrics.e2e import (
    METRICS,
    PERCENT_METRICS,
    SCORER,
    ScoreInputError,
    format_hypotheses,
    format_references,
    read_e2e_files,
    score_e2e,
)
from sflllm.metrics.mteval import bleu, mteval_tokenize, nist, nist_length_penalty

__all__ = [
    "METRICS",
    "PERCENT_METRICS",
    "PTB_PUNCTUATION",
    "SCORER",
    "MeteorScorer",
    "MetricsError",
    "ScoreInputError",
    "bleu",
    "cider",
    "coco_tokenize",
    "format_hypotheses",
    "format_references",
    "java_executable",
    "mteval_tokenize",
    "nist",
    "nist_length_penalty",
    "ptb_tokenize",
    "ptb_tokenize_approx",
    "read_e2e_files",
    "rouge_l",
    "score_e2e",
]
