"""Prompt template, causal-LM tokenisation with loss only on the reference, and the demo tokenizer.

Training text for one example is ``prompt_ids(mr) + reference_ids(" " + ref) + [eos]``:
the prompt is tokenised with the tokenizer's own special tokens (Llama/SentencePiece and the demo
tokenizer add BOS, GPT-2 adds none), the reference without, so generation can feed exactly the
training prompt and decode only the new tokens.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from sflllm.model.loss import IGNORE_INDEX  # label value the LM loss ignores (prompt and padding)

from .e2e import SLOT_VALUES, Example, food_phrase, format_mr, normalize_whitespace, synthetic_phrases

#: The fixed prompt around a (whitespace-normalised) MR; the reference follows after one space.
PROMPT_TEMPLATE = "{mr} =>"


def build_prompt(mr: str) -> str:
    """The prompt text for one MR: ``PROMPT_TEMPLATE`` around the whitespace-normalised MR."""
    return PROMPT_TEMPLATE.format(mr=normalize_whitespace(mr))


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id; a tokenizer without one cannot mark where a reference ends."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; one is required")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (Llama, GPT-2)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, mrs: Sequence[str]) -> list[list[int]]:
    """Token ids of the prompts of ``mrs`` (with the tokenizer's own special tokens, e.g. BOS)."""
    return tokenizer([build_prompt(mr) for mr in mrs], add_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class TokenizedExamples:
    """Right-padded causal-LM tensors, all ``(N, seq_len)`` int64, plus the source texts.

    ``labels`` equals ``input_ids`` on reference and EOS tokens and ``IGNORE_INDEX`` on prompt and
    padding positions (aligned with ``input_ids``; the loss shifts them).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    mrs: tuple[str, ...]
    refs: tuple[str, ...]

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        for name in ("input_ids", "attention_mask", "labels"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.shape != shape or tensor.dtype != torch.long:
                raise ValueError(f"{name} must be an int64 tensor of shape {tuple(shape)}, got "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
        if not len(self.mrs) == len(self.refs) == shape[0]:
            raise ValueError(f"mrs ({len(self.mrs)}) and refs ({len(self.refs)}) must have one entry per row ({shape[0]})")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedExamples:
        """The rows ``indices`` (e.g. one client's share from :func:`partition`), in that order."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        rows = index.tolist()
        return TokenizedExamples(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            labels=self.labels[index],
            mrs=tuple(self.mrs[i] for i in rows),
            refs=tuple(self.refs[i] for i in rows),
        )


def _encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase
) -> tuple[tuple[str, ...], tuple[str, ...], list[list[int]], list[list[int]]]:
    """(MRs, references, prompt ids, reference ids) of ``examples``, whitespace-normalised."""
    mrs = tuple(normalize_whitespace(e.mr) for e in examples)
    refs = tuple(normalize_whitespace(e.ref) for e in examples)
    prompts = prompt_ids(tokenizer, mrs)
    references = tokenizer([" " + ref for ref in refs], add_special_tokens=False)["input_ids"]
    return mrs, refs, prompts, references


def longest_example(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens in the longest training row of ``examples`` (prompt + reference + EOS): the seq_len that
    truncates none of them."""
    _, _, prompts, references = _encode(examples, tokenizer)
    return max(len(p) + len(r) + 1 for p, r in zip(prompts, references))


def tokenize(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> TokenizedExamples:
    """Tokenise ``examples`` for causal-LM fine-tuning with the loss on the reference only.

    Each row is ``prompt + " " + ref + EOS``, right-padded with the pad id (EOS when the tokenizer
    has none) to ``seq_len``. Too long rows keep the whole prompt and truncate the reference
    (and its EOS) at ``seq_len``; the number of truncated rows is reported with a warning.
    A prompt that leaves no room for a single reference token is an error (raised, listing how many
    rows and the longest prompt), never a silent drop: dropping would change the clients' data sizes.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not examples:
        raise ValueError("no examples to tokenize")
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    mrs, refs, prompts, references = _encode(examples, tokenizer)

    too_long = [i for i, p in enumerate(prompts) if len(p) >= seq_len]
    if too_long:
        longest = max(len(prompts[i]) for i in too_long)
        raise ValueError(
            f"seq_len={seq_len} leaves no room for the reference in {len(too_long)} of {len(examples)} "
            f"examples (longest prompt {longest} tokens, first at row {too_long[0]}); raise seq_len"
        )

    ids_rows, mask_rows, label_rows = [], [], []
    truncated = 0
    for p, r in zip(prompts, references):
        target = (list(r) + [eos])[: seq_len - len(p)]
        truncated += len(target) < len(r) + 1
        padding = seq_len - len(p) - len(target)
        ids_rows.append(list(p) + target + [pad] * padding)
        mask_rows.append([1] * (len(p) + len(target)) + [0] * padding)
        label_rows.append([IGNORE_INDEX] * len(p) + target + [IGNORE_INDEX] * padding)
    if truncated:
        warnings.warn(f"{truncated} of {len(examples)} references were truncated to fit seq_len={seq_len}", stacklevel=2)
    return TokenizedExamples(
        input_ids=torch.tensor(ids_rows, dtype=torch.long),
        attention_mask=torch.tensor(mask_rows, dtype=torch.long),
        labels=torch.tensor(label_rows, dtype=torch.long),
        mrs=mrs,
        refs=refs,
    )


# ---------------------------------------------------------------------------------------------
# Demo tokenizer
# ---------------------------------------------------------------------------------------------

DEMO_SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
_SPACE = "\u2581"  # "▁", SentencePiece's word-start marker


def _demo_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words carry a "▁" when a space preceded them and punctuation is split off, so decoding is
    # lossless: "It is family-friendly." -> ▁It ▁is ▁family - friendly .
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])


def _demo_corpus() -> list[str]:
    """Strings whose pre-tokens are every word the synthetic generator and prompt can produce.

    A pre-token depends only on the value/literal itself and whether a space precedes it, so
    filling every placeholder of every template with every slot value covers all combinations.
    """
    values = sorted(
        {v for options in SLOT_VALUES.values() for v in options}
        | {food_phrase(v) for v in SLOT_VALUES["food"]}
        | {"place"}
    )
    corpus = [build_prompt(format_mr(dict.fromkeys(SLOT_VALUES, v))) for v in values]
    for phrase in synthetic_phrases():
        corpus.append(phrase.format(name="X", eatType="X", v="X"))
        for placeholder in ("name", "eatType", "v"):
            if "{" + placeholder + "}" in phrase:
                for v in values:
                    corpus.append(phrase.format(**{"name": "X", "eatType": "X", "v": "X", placeholder: v}))
    return corpus


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """An offline word-level tokenizer covering the synthetic generator's vocabulary.

    ``tokenizers`` WordLevel model; pre-tokenizer: Metaspace (words keep a leading "▁" after a
    space) then punctuation isolated; Metaspace decoder (so decode(encode(text)) == text for
    generator text). Special tokens ``[PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3``; BOS is prepended when
    ``add_special_tokens=True``. The vocabulary is sorted, so it is identical on every call.
    """
    pre_tokenizer = _demo_pre_tokenizer()
    words = sorted({piece for text in _demo_corpus() for piece, _ in pre_tokenizer.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(itertools.chain(DEMO_SPECIAL_TOKENS, words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
