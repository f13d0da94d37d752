"""The five E2E NLG Challenge metrics of a system output, and the scorer's plain-text file format.

:func:`score_e2e` gives BLEU, NIST, METEOR, ROUGE-L and CIDEr as e2e-metrics' ``measure_scores.py
-p`` (the official scorer the LoRA, SplitLoRA and SflLLM papers used) computes them: BLEU and NIST in
:mod:`sflllm.metrics.mteval`, the other three in :mod:`sflllm.metrics.coco`. Scale as the papers
print them: BLEU, METEOR and ROUGE-L x100, NIST and CIDEr as they are.

The file format (:func:`read_e2e_files`, :func:`format_hypotheses`, :func:`format_references`):

- hypotheses: one per line;
- references: the references of each MR one per line, each MR's block ended by an empty line (a file
  without any empty line holds one reference per MR, as the official scorer reads it).

Lines are stripped, and a line wrapped in matching quotes that forms a Python string literal is
unquoted, as the official scorer does (it ``eval``s them; here ``ast.literal_eval``).
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sflllm.metrics.coco import MeteorScorer, cider, coco_tokenize, java_executable, rouge_l
from sflllm.metrics.mteval import bleu, nist

__all__ = [
    "METRICS",
    "PERCENT_METRICS",
    "SCORER",
    "ScoreInputError",
    "format_hypotheses",
    "format_references",
    "read_e2e_files",
    "score_e2e",
]

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")  # the keys of score_e2e, in the papers' order
PERCENT_METRICS = frozenset({"bleu", "meteor", "rouge_l"})  # reported x100
SCORER = (
    "official E2E scorer (e2e-metrics measure_scores.py -p) equivalent: BLEU, NIST as its pymteval; "
    "METEOR 1.5, ROUGE-L, CIDEr by pycocoevalcap on Stanford PTB tokens"
)


class ScoreInputError(ValueError):
    """Bad scorer input (missing, binary or malformed file, count mismatch): one line, exit code 2."""


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ScoreInputError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ScoreInputError("no hypotheses to score")
    for i, refs in enumerate(references, start=1):
        if not refs:
            raise ScoreInputError(f"MR {i} has no reference")
        if any(not r.strip() for r in refs):
            raise ScoreInputError(f"MR {i} has an empty reference")


def score_e2e(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    meteor: bool | MeteorScorer = True,
) -> dict[str, Any]:
    """The E2E metrics of ``hypotheses[i]`` against the references ``references[i]`` of MR i.

    ``meteor``: True starts METEOR for this call (10-30 s of Java start-up), a running
    :class:`MeteorScorer` is reused (and left running), False leaves METEOR out. Without Java METEOR
    is left out and ROUGE-L and CIDEr use the Python approximation of the PTB tokenisation.

    Returns (JSON-serialisable) ``{"bleu", "nist", ["meteor"], "rouge_l", "cider", "num_hypotheses",
    "num_references", "tokenizer", "scorer", "notes"}``: BLEU, METEOR, ROUGE-L x100; ``notes`` says
    why a metric is missing or approximated. Raises :class:`ScoreInputError` on a count mismatch, an
    MR without references or an empty reference.
    """
    _check(hypotheses, references)
    java = java_executable()
    notes: list[str] = []
    own_meteor = meteor is True and java is not None
    meteor_scorer = MeteorScorer(java) if own_meteor else (meteor if isinstance(meteor, MeteorScorer) else None)
    try:  # METEOR's start-up (the paraphrase table) overlaps the work below
        scores: dict[str, Any] = {"bleu": 100 * bleu(hypotheses, references), "nist": nist(hypotheses, references)}
        hyp_tokens, ref_tokens = coco_tokenize(hypotheses, references, java)
        scores["rouge_l"] = 100 * rouge_l(hyp_tokens, ref_tokens)
        scores["cider"] = cider(hyp_tokens, ref_tokens)
        if meteor_scorer is not None:
            scores["meteor"] = 100 * meteor_scorer.score(hyp_tokens, ref_tokens)
        elif meteor is not False:
            notes.append("meteor omitted: java not found on PATH (METEOR 1.5 is a Java program)")
        else:
            notes.append("meteor omitted on request")
    finally:
        if own_meteor and meteor_scorer is not None:
            meteor_scorer.close()
    if java is None:
        notes.append(
            "rouge_l and cider on a Python approximation of the Stanford PTB tokenisation (java not found on PATH)"
        )
    return {
        **{name: float(scores[name]) for name in METRICS if name in scores},
        "num_hypotheses": len(hypotheses),
        "num_references": sum(len(refs) for refs in references),
        "tokenizer": "stanford-ptb (java)" if java is not None else "ptb approximation (python)",
        "scorer": SCORER,
        "notes": notes,
    }


# --------------------------------------------------------------------------- the plain-text format


def _unquote(line: str) -> str:
    """The official reader's quote stripping: ``"text"`` / ``'text'`` that is a string literal -> text."""
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return line
        return str(value)
    return line


def _read_lines(path: Path, option: str) -> list[str]:
    """Stripped, unquoted lines of a UTF-8 text file; ScoreInputError naming ``option`` and the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ScoreInputError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise ScoreInputError(f"{option} {path}: is a directory, not a text file") from None
    except OSError as e:
        raise ScoreInputError(f"{option} {path}: {e.strerror or e}") from None
    if b"\x00" in data:
        raise ScoreInputError(f"{option} {path}: binary file (contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ScoreInputError(f"{option} {path}: not UTF-8 text (byte {e.start}): binary file?") from None
    return [_unquote(line.strip()) for line in text.splitlines()]


def read_e2e_files(hyp: Path, ref: Path) -> tuple[list[str], list[list[str]]]:
    """(hypotheses, references per MR) from the official scorer's plain-text files (module doc).

    Raises :class:`ScoreInputError` (naming ``--hyp`` / ``--ref`` and the file) when a file is
    missing, binary or not UTF-8, has no hypothesis, has an empty reference block (two empty lines in
    a row), or when the number of hypotheses and of reference blocks differ.
    """
    hypotheses = _read_lines(hyp, "--hyp")
    if not hypotheses:
        raise ScoreInputError(f"--hyp {hyp}: no hypotheses (empty file)")
    lines = _read_lines(ref, "--ref")
    if not any(lines):
        raise ScoreInputError(f"--ref {ref}: no references (empty file)")
    if "" not in lines:  # the official scorer's single-reference file: one reference per MR
        references = [[line] for line in lines]
    else:
        references, starts = [[]], [1]  # each block and the line it starts on
        for number, line in enumerate(lines, start=1):
            if line:
                references[-1].append(line)
            else:
                references.append([])
                starts.append(number + 1)
        if not references[-1]:  # the empty line that ends the last block
            references.pop()
        for k, block in enumerate(references):
            if not block:
                raise ScoreInputError(
                    f"--ref {ref}: reference block {k + 1} (line {starts[k]}) is empty: "
                    "end each MR's references with exactly one empty line"
                )
    if len(hypotheses) != len(references):
        raise ScoreInputError(
            f"--hyp {hyp} has {len(hypotheses)} hypotheses but --ref {ref} has {len(references)} reference blocks "
            "(each MR's references end with an empty line)"
        )
    return hypotheses, references


def _line(text: str) -> str:
    return " ".join(text.split())  # line breaks inside a text become spaces, as pycocoevalcap does


def format_hypotheses(hypotheses: Sequence[str]) -> str:
    """The hypotheses file: one whitespace-normalised hypothesis per line."""
    return "".join(_line(h) + "\n" for h in hypotheses)


def format_references(references: Sequence[Sequence[str]]) -> str:
    """The references file: each MR's references one per line, each block ended by an empty line."""
    blocks = []
    for i, refs in enumerate(references, start=1):
        lines = [_line(r) for r in refs]
        if not lines or not all(lines):
            raise ValueError(f"MR {i} needs at least one non-empty reference")
        blocks.append("".join(line + "\n" for line in lines) + "\n")
    return "".join(blocks)
