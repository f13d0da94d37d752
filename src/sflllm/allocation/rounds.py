"""The allocation in force in each training round of a closed-loop run (``sflllm run``), per method.

The optimiser (spec §5) picks each method's (l, r) once; during the run (l, r) stay fixed and only
the subchannels and powers may change from round to round:

* ``fading="static"``: the realised gains hold for the whole run. The deterministic methods
  (proposed, fixed_split, fixed_rank, equal_power) use the same allocation every round. The random
  baselines draw a fresh random assignment every round (their randomness is per round, so the run
  averages over draws as the spec's mean over ``random_draws`` does).
* ``fading="block"``: before every round the small-scale fading |h|^2 ~ Exp(1) of both uplinks is
  redrawn (Rayleigh, whatever ``network.fading`` says; the large-scale gains gbar stay, and explicit
  ``gains_ms``/``gains_fs`` are replaced by gbar |h|^2) and every method re-solves its subchannels
  and powers for that round's gains.

Seeded streams (so that a resumed run and a test recompute exactly the same rounds):
round t (1-based) of block fading draws from ``default_rng([seed, 1, t])`` (MS K x M, then FS K x N);
a random baseline's round t draws from ``default_rng([seed + 1, method_number, t])`` (MS assignment,
then FS assignment) with method_number 0 for random_subchannel and 1 for random_all.

T_round of a round is spec §4's ``I T_iter + T_agg`` for that round's allocation (``cost.delay``).
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from sflllm.allocation import link as link_solver
from sflllm.allocation.link import LinkAllocation
from sflllm.allocation.optimize import Problem, build_problem
from sflllm.allocation.scenario import Realised
from sflllm.cost.delay import DelayReport, SystemTimes, evaluate_delay
from sflllm.cost.profile import CostNumbers
from sflllm.network.channels import draw_fading

Fading = Literal["static", "block"]
FADING = ("static", "block")
RANDOM_METHODS = {"random_subchannel": 0, "random_all": 1}
DETERMINISTIC_METHODS = ("proposed", "fixed_split", "fixed_rank", "equal_power")


@dataclass(frozen=True)
class RoundAllocation:
    """One method's allocation in one round and its spec §4 delays (``delay.round_delay_s`` = T_round)."""

    method: str
    round: int
    split_layer: int
    rank: int
    ms: LinkAllocation
    fs: LinkAllocation     # powers and owners; rate_bps holds for any payload (the FS link has c = 0)
    delay: DelayReport     # with E = 1: total_delay_s = round_delay_s and the breakdown is one round's

    def as_json(self) -> dict:
        """The allocation in force (owners, powers, rates on both links) and the round's delays."""
        return {
            "round": self.round,
            "round_delay_s": self.delay.round_delay_s,
            "iteration_delay_s": self.delay.iteration_delay_s,
            "aggregation_delay_s": self.delay.aggregation_delay_s,
            "breakdown": dict(self.delay.breakdown),
            "assignment_ms": self.ms.owner.tolist(),
            "power_ms_w": self.ms.power_w.tolist(),
            "rate_ms_bps": self.ms.rate_bps.tolist(),
            "assignment_fs": self.fs.owner.tolist(),
            "power_fs_w": self.fs.power_w.tolist(),
            "rate_fs_bps": self.fs.rate_bps.tolist(),
        }


def block_fading_realised(realised: Realised, round_number: int) -> Realised:
    """``realised`` with both uplinks' small-scale fading redrawn for round ``round_number`` (1-based)."""
    rng = np.random.default_rng([realised.scenario.seed, 1, round_number])
    K = realised.num_clients
    gains_ms = realised.downlink_gain_ms[:, None] * draw_fading(rng, K, realised.gains_ms.shape[1], "rayleigh")
    gains_fs = realised.downlink_gain_fs[:, None] * draw_fading(rng, K, realised.gains_fs.shape[1], "rayleigh")
    return replace(realised, gains_ms=gains_ms, gains_fs=gains_fs)


def round_delay_report(problem: Problem, pair_index: int, ms: LinkAllocation, fs: LinkAllocation) -> DelayReport:
    """Spec §4 delays of one round (E = 1) for pair ``pair_index`` and the two uplink allocations."""
    training = problem.realised.scenario.training
    numbers = CostNumbers(**{key: float(value[pair_index]) for key, value in vars(problem.terms.numbers).items()})
    times = SystemTimes(batch_size=training.batch_size, local_steps=training.local_steps, rounds=1,
                        client_flops=problem.realised.client_flops,
                        server_flops=problem.realised.scenario.server.flops)
    return evaluate_delay(numbers, times, rate_ms_bps=ms.rate_bps, rate_fs_bps=fs.rate_bps,
                          downlink_rate_ms_bps=problem.downlink_rate_ms_bps,
                          downlink_rate_fs_bps=problem.downlink_rate_fs_bps)


def allocate(problem: Problem, method: str, pair_index: int,
             rng: np.random.Generator | None = None) -> tuple[LinkAllocation, LinkAllocation]:
    """(MS, FS) allocation of ``method`` at a fixed pair (spec §5's per-link step for that method).

    A random baseline needs ``rng`` (its MS assignment is drawn first, then its FS assignment).
    """
    c = problem.ms_fixed_latency(pair_index)
    D = problem.ms_bits
    zeros = np.zeros(problem.realised.num_clients)
    ms_link, fs_link = problem.ms_link, problem.fs_link
    if method in ("proposed", "fixed_split", "fixed_rank"):
        return link_solver.solve_link(ms_link, c, D), link_solver.solve_link(fs_link, zeros, 1.0)
    if method == "equal_power":
        return (link_solver.equal_power_allocation(ms_link, link_solver.greedy_assignment(ms_link, c, D), c, D),
                link_solver.equal_power_allocation(fs_link, link_solver.greedy_assignment(fs_link, zeros, 1.0),
                                                   zeros, 1.0))
    if method in RANDOM_METHODS:
        if rng is None:
            raise ValueError(f"allocate: method {method!r} draws its assignment and needs an rng")
        owner_ms = link_solver.random_assignment(rng, problem.realised.num_clients, ms_link.num_subchannels)
        owner_fs = link_solver.random_assignment(rng, problem.realised.num_clients, fs_link.num_subchannels)
        if method == "random_subchannel":
            return (link_solver.power_control(ms_link, owner_ms, c, D),
                    link_solver.power_control(fs_link, owner_fs, zeros, 1.0))
        return (link_solver.equal_power_allocation(ms_link, owner_ms, c, D),
                link_solver.equal_power_allocation(fs_link, owner_fs, zeros, 1.0))
    raise ValueError(f"allocate: unknown method {method!r}")


def round_allocations(realised: Realised, pairs: dict[str, tuple[int, int]], rounds: int,
                      fading: Fading = "static") -> dict[str, list[RoundAllocation]]:
    """Every method's allocation and T_round for rounds 1..``rounds`` with its pair held fixed.

    ``pairs`` maps method name to its (split_layer, rank), which must be an allowed pair of ``realised``.
    """
    if fading not in FADING:
        raise ValueError(f"fading: unknown {fading!r} (choose one of {', '.join(FADING)})")
    out: dict[str, list[RoundAllocation]] = {method: [] for method in pairs}
    static = build_problem(realised) if fading == "static" else None
    fixed: dict[str, tuple[LinkAllocation, LinkAllocation]] = {}
    for t in range(1, rounds + 1):
        problem = static if static is not None else build_problem(block_fading_realised(realised, t))
        for method, (l, r) in pairs.items():
            index = problem.terms.pairs.index((l, r))
            if method in RANDOM_METHODS:
                rng = np.random.default_rng([realised.scenario.seed + 1, RANDOM_METHODS[method], t])
                ms, fs = allocate(problem, method, index, rng)
            elif static is not None and method in fixed:
                ms, fs = fixed[method]
            else:
                ms, fs = fixed[method] = allocate(problem, method, index)
            out[method].append(RoundAllocation(method, t, l, r, ms, fs, round_delay_report(problem, index, ms, fs)))
    return out
