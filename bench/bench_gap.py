"""Optimality gap of the per-link "proposed" solver (spec §5) against the exact one, and timings.

    python bench/bench_gap.py [--instances 200] [--seed 0]

Draws seeded small instances (K = 2..4 clients, M = max(K, 4)..8 subchannels, gains from the spec §3
path loss + Rayleigh model at 50-300 m, Pmax[k] in 0.1-0.3 W, link budget Pth = 0.2..3 sum_k Pmax[k]
so that Pth binds in some and not in others) in two families: "c>0", the MS link's shape (compute
term c[k] in [0, 2] s, payload D spread over two decades), and "c=0", the FS link's shape (c = 0;
the problem is then scale-free in D).  For each it prints the mean, 90th percentile and worst
relative gap value(solve_link) / value(solve_link_exact) - 1, the same for the greedy alone (spec §5
steps 1-2), how many instances have Pth binding at the optimum, and the CPU time of power_control
and solve_link at K = 50, M = 128.  CPU time (time.process_time) is reported because
wall time on a shared machine mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sflllm.allocation.link import Link, greedy_assignment, power_control, solve_link, solve_link_exact
from sflllm.network.channels import draw_fading, large_scale_gain, noise_w_per_hz

BITS_PER_ITERATION = 8 * (512 * 768 * 32 + 512 * 32)  # b (A + Y) of spec §2 for GPT-2 at s = 512, b = 8


FAMILIES = ("c>0", "c=0")
PTH_FACTORS = (0.2, 0.3, 0.5, 0.9, 1.5, 3.0)  # Pth / sum_k Pmax[k]


def draw_instance(rng: np.random.Generator, K: int, M: int, pth_factor: float,
                  family: str = "c>0") -> tuple[Link, np.ndarray, float]:
    """One link with the spec's default radio parameters and Pth = ``pth_factor`` sum_k Pmax[k].

    Family "c>0": c[k] in [0, 2] s and D = 10^U(-1, 1) times a GPT-2 iteration's b (A+Y) / 10 (the MS
    link); "c=0": c = 0 and D = 1 bit (the FS link; its solution does not depend on D).
    """
    distance = rng.uniform(50.0, 300.0, size=K)
    gains = large_scale_gain(distance, np.zeros(K), 128.1, 37.6)[:, None] * draw_fading(rng, K, M, "rayleigh")
    p_max = rng.uniform(0.1, 0.3, size=K)
    link = Link(gains=gains, bandwidth_hz=1e6, noise_w_per_hz=noise_w_per_hz(-174.0), p_max_w=p_max,
                p_th_w=p_max.sum() * pth_factor)
    if family == "c=0":
        return link, np.zeros(K), 1.0
    return link, rng.uniform(0.0, 2.0, size=K), BITS_PER_ITERATION / 10 * 10 ** rng.uniform(-1.0, 1.0)


def gap_table(instances: int, seed: int, family: str = "c>0") -> dict[str, np.ndarray]:
    """Per instance: relative gaps of solve_link and of the greedy (steps 1-2), and whether Pth binds."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    rng = np.random.default_rng(seed)
    proposed, greedy, pth_binds = [], [], []
    for n in range(instances):
        K = int(rng.integers(2, 5))
        M = int(rng.integers(max(K, 4), 9))
        link, c, data_bits = draw_instance(rng, K, M, PTH_FACTORS[n % len(PTH_FACTORS)], family)
        exact = solve_link_exact(link, c, data_bits)
        proposed.append(solve_link(link, c, data_bits).value_s / exact.value_s - 1)
        greedy_only = power_control(link, greedy_assignment(link, c, data_bits), c, data_bits)
        greedy.append(greedy_only.value_s / exact.value_s - 1)
        pth_binds.append(exact.power_w.sum() >= link.p_th_w * (1 - 1e-9))
    return {"proposed": np.array(proposed), "greedy": np.array(greedy), "pth_binds": np.array(pth_binds)}


def summary(gaps: np.ndarray) -> dict[str, float]:
    return {"mean": float(gaps.mean()), "p90": float(np.percentile(gaps, 90)), "worst": float(gaps.max())}


def cpu_ms(fn, repeat: int) -> float:
    """Best-of-three mean CPU milliseconds of ``fn()`` over ``repeat`` calls."""
    best = np.inf
    for _ in range(3):
        start = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - start) / repeat)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    for family in FAMILIES:
        table = gap_table(args.instances, args.seed, family)
        print(f"family {family}: {args.instances} instances (K 2-4, M <= 8), "
              f"Pth binds at the optimum in {int(table['pth_binds'].sum())}")
        for name in ("proposed", "greedy"):
            s = summary(table[name])
            print(f"  {name:>9} gap: mean {100 * s['mean']:.3f}%  p90 {100 * s['p90']:.3f}%  "
                  f"worst {100 * s['worst']:.3f}%")

    rng = np.random.default_rng(args.seed)
    for tight in (True, False):
        link, c, data_bits = draw_instance(rng, 50, 128, 0.3 if tight else 2.0)
        owner = greedy_assignment(link, c, data_bits)
        label = "Pth tight" if tight else "Pth loose"
        print(
            f"K=50 M=128 ({label}): power_control {cpu_ms(lambda: power_control(link, owner, c, data_bits), 20):.2f} ms"
            f"  solve_link {cpu_ms(lambda: solve_link(link, c, data_bits), 3):.1f} ms (CPU)"
        )


if __name__ == "__main__":
    main()
