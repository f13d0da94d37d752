"""The ``sflllm score`` run: read the official E2E scorer's plain-text files, score, print.

No torch. See :mod:`sflllm.metrics` for what each metric is and how it equals the official scorer.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sflllm.metrics import METRICS, PERCENT_METRICS, read_e2e_files, score_e2e

LABELS = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}


def score_files(hyp: Path, ref: Path, *, meteor: bool = True, progress: bool = True) -> dict[str, Any]:
    """:func:`sflllm.metrics.score_e2e` of the files ``hyp`` and ``ref`` (ScoreInputError on bad input),
    with a spinner on stderr while it runs (METEOR's Java start-up alone takes 10-30 s)."""
    hypotheses, references = read_e2e_files(hyp, ref)
    status = f"scoring {len(hypotheses)} hypotheses against {sum(map(len, references))} references"
    spinner = Console(stderr=True).status(status + (" (METEOR starts in 10-30 s)" if meteor else ""))
    with spinner if progress else nullcontext():
        return score_e2e(hypotheses, references, meteor=meteor)


def print_scores(scores: dict[str, Any], *, as_json: bool, console: Console | None = None) -> None:
    """One JSON object (``--json``) or a table; BLEU, METEOR and ROUGE-L are already x100."""
    if as_json:
        print(json.dumps(scores))
        return
    console = console or Console()
    table = Table(title=f"E2E metrics of {scores['num_hypotheses']} hypotheses ({scores['num_references']} references)")
    for name in METRICS:
        table.add_column(LABELS[name] + (" x100" if name in PERCENT_METRICS else ""), justify="right")
    table.add_row(*(f"{scores[name]:.2f}" if name in scores else "-" for name in METRICS))
    console.print(table)
    for note in scores["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)
