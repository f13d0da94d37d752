"""E2E data: loading (CSV/JSONL/hub), a built-in synthetic generator, tokenisation, client partitions."""

from .e2e import (
    E2E_SLOTS,
    Example,
    format_mr,
    load_examples,
    normalize_whitespace,
    parse_mr,
    synthetic_examples,
)
from .partition import partition
from .tokenization import (
    PROMPT_TEMPLATE,
    TokenizedExamples,
    build_demo_tokenizer,
    build_prompt,
    eos_token_id,
    longest_example,
    pad_token_id,
    prompt_ids,
    tokenize,
)

__all__ = [
    "E2E_SLOTS",
    "PROMPT_TEMPLATE",
    "Example",
    "TokenizedExamples",
    "build_demo_tokenizer",
    "build_prompt",
    "eos_token_id",
    "format_mr",
    "load_examples",
    "longest_example",
    "normalize_whitespace",
    "pad_token_id",
    "parse_mr",
    "partition",
    "prompt_ids",
    "synthetic_examples",
    "tokenize",
]
