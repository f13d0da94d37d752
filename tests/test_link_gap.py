"""Quality of the "proposed" per-link solver against the exact optimum (spec §5), on the seeded
instances of bench/bench_gap.py (both families: c > 0, the MS link's shape, and c = 0, the FS link's):
a regression in the heuristic fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sflllm.allocation.link import Link, solve_link, solve_link_exact
from sflllm.network.channels import noise_w_per_hz

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gap.py"
INSTANCES = 120


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gap", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["c>0", "c=0"])
def test_proposed_is_near_optimal_on_small_instances(family):
    table = load_bench().gap_table(instances=INSTANCES, seed=1, family=family)
    gaps = table["proposed"]
    assert gaps.min() > -1e-9, "the heuristic cannot beat the exact optimum"
    assert gaps.mean() < 0.005 and np.percentile(gaps, 90) < 0.01
    assert gaps.max() < 0.02  # issue 3's "best in class" worst case
    # the set exercises both regimes, and the local search matters: the greedy alone is worse
    assert 0 < table["pth_binds"].sum() < INSTANCES
    assert table["greedy"].mean() > gaps.mean()


# An independent audit's worst case for the previous solver (4 random restarts): 3.56% above the
# optimum.  c = 0 (the FS link's problem), K = 4, M = 7, Pth = 0.9 sum Pmax (Pmax binds, Pth not).
AUDIT_GAINS = [
    [1.2172558190717911e-11, 2.625112934067815e-11, 9.564932583775186e-11, 2.0253332348694547e-10,
     1.256492693596159e-10, 1.6550828503694923e-11, 2.4504400890637794e-10],
    [2.6568620689769815e-11, 2.4221421775278608e-12, 1.551577404391214e-11, 3.3160836218832277e-12,
     3.2975145612965083e-12, 3.760021046589024e-12, 2.5065339900632982e-11],
    [6.929240821801777e-11, 2.0281765251894336e-10, 5.000021863780737e-11, 4.189169271516163e-10,
     4.182452291715693e-10, 7.888515393355782e-11, 2.596546527574381e-10],
    [3.9009481165622206e-11, 4.106782040056786e-11, 4.036028782381162e-10, 4.031610146222346e-11,
     3.391162898175462e-11, 4.4811152921444465e-11, 8.034059876218072e-12],
]
AUDIT_P_MAX = [0.1106520331299334, 0.07784401637568909, 0.19760033647255398, 0.2921628678556157]


def test_audit_worst_case_with_zero_compute_term():
    link = Link(np.array(AUDIT_GAINS), 1e6, noise_w_per_hz(-174.0), np.array(AUDIT_P_MAX), 0.610433328450413)
    c = np.zeros(4)
    proposed, exact = solve_link(link, c, 1e6), solve_link_exact(link, c, 1e6)
    assert proposed.value_s <= exact.value_s * (1 + 1e-3)
