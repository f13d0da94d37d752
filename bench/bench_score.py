"""Time to score the full E2E test set as the official scorer does, with and without METEOR.

    python bench/bench_score.py [--testset ../shared/data/e2e/testset_w_refs.csv]

Hypotheses: for each of the 630 MRs, (a) "loo": its first reference, scored against the others
(MRs with one reference: against itself), and (b) "template": a one-sentence template filled from the
MR. Prints each metric and the time of ``score_e2e`` with METEOR (Java start-up included) and
without, and of BLEU + NIST alone: wall time, and CPU time of this process and of its children (the
Java tokeniser and METEOR), which a busy shared machine inflates less than wall time.
"""

from __future__ import annotations

import argparse
import csv
import re
import resource
import time
from pathlib import Path

from sflllm.experiments.evaluation import group_references
from sflllm.data import Example
from sflllm.metrics import bleu, nist, score_e2e

DEFAULT_TESTSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "testset_w_refs.csv"


def template(mr: str) -> str:
    slots = dict(re.findall(r"(\w[\w ]*)\[([^\]]*)\]", mr))
    text = f"{slots.get('name', 'It')} is a {slots.get('eatType', 'place')}"
    if "food" in slots:
        text += f" serving {slots['food']} food"
    if "near" in slots:
        text += f" near {slots['near']}"
    return text + "."


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testset", type=Path, default=DEFAULT_TESTSET)
    args = parser.parse_args()
    with open(args.testset, encoding="utf-8", newline="") as f:
        examples = [Example(row["mr"], row["ref"]) for row in csv.DictReader(f)]
    mrs, references = group_references(examples)
    sets = {
        "loo": ([refs[0] for refs in references], [refs[1:] or refs for refs in references]),
        "template": ([template(mr) for mr in mrs], references),
    }
    print(f"{len(mrs)} MRs, {len(examples)} references")
    for name, (hyps, refs) in sets.items():
        start = time.process_time()
        bleu(hyps, refs), nist(hyps, refs)
        print(f"{name:8s} BLEU + NIST alone: {time.process_time() - start:.2f} s CPU")
        for meteor in (False, True):
            start, (own, children) = time.perf_counter(), _cpu()
            scores = score_e2e(hyps, refs, meteor=meteor)
            wall, (own_end, children_end) = time.perf_counter() - start, _cpu()
            values = ", ".join(f"{k} {scores[k]:.2f}" for k in ("bleu", "nist", "meteor", "rouge_l", "cider") if k in scores)
            print(
                f"{name:8s} meteor={meteor!s:5s}: {wall:5.1f} s wall, CPU {own_end - own:.1f} s Python + "
                f"{children_end - children:.1f} s Java ({values})"
            )


if __name__ == "__main__":
    main()
