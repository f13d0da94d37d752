"""Joint optimisation of subchannels, power, split layer and rank (spec §5), and the baselines.

For a fixed pair (l, r) the problem separates into the MS link (c[k] = b F_c / f[k], D = b (A+Y))
and the FS link (c = 0, D = Lam). Everything else in T_total (server compute, downlink, the FS's
broadcast) does not depend on the allocation, so it is computed for all pairs at once
(``PairTerms``). With c = 0 the FS problem is scale-free: an allocation optimal for D = 1 bit is
optimal for every D with value D * (its value at D = 1) (every step of the solvers compares
latencies D / R[k] that all scale with D), so the FS link is solved once per method.

Search over pairs (spec §5 step 4) is exhaustive but skips pairs that provably cannot win:
pairs are visited in order of a lower bound on T_total, and the search stops when the next lower
bound reaches the best value found. Bounds used:

* any allocation: t >= the t solving sum_k D / (t - c[k]) = SR, SR the largest sum rate of the link
  (each subchannel at its best client's gain, the link's usable power water-filled over them);
* an exact evaluator (exact power control of a fixed assignment, the exact solver): its optimal
  value v is non-decreasing in c and drops by at most max_k(c[k] - c'[k]) when c falls to c', and
  c = F_c * b / f, so a value found at one pair bounds every other pair.

Both are valid lower bounds on the value the evaluator would return, so the result equals the
unpruned exhaustive search; results are cached per pair, so fixed_split and fixed_rank reuse
"proposed"'s per-pair solutions and can never beat it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from sflllm.allocation import link as link_solver
from sflllm.allocation.link import Link, LinkAllocation
from sflllm.allocation.scenario import Realised, Scenario
from sflllm.cost.delay import (
    DelayReport,
    SystemTimes,
    activation_uplink_bits,
    broadcast_delay,
    client_downlink_delays,
    client_forward_delays,
    evaluate_delay,
    iteration_delay,
    round_delay,
    server_compute_delay,
    total_delay,
)
from sflllm.cost.profile import CostNumbers, cost_numbers
from sflllm.network.channels import downlink_rates

BASELINES = ("random_subchannel", "equal_power", "fixed_split", "fixed_rank", "random_all")
METHODS = ("proposed", "exact") + BASELINES


class MethodError(ValueError):
    """A method cannot run on this scenario (e.g. the exact solver on a large instance)."""


# ------------------------------------------------------------------------------------ pair terms

@dataclass(frozen=True)
class PairTerms:
    """Allocation-independent parts of T_total for every allowed pair (arrays over pairs)."""

    pairs: tuple[tuple[int, int], ...]
    numbers: CostNumbers          # F_c, B_c, S, A, Y, G, Lam as arrays over pairs
    rounds: np.ndarray            # E(r)
    fixed_iteration_s: np.ndarray  # K b S / f_s + max_k T_down[k]
    broadcast_s: np.ndarray       # max_k Lam / Rdl_f[k]
    local_steps: int

    def total(self, index, ms_value_s, fs_value_s):
        """T_total = E (I (max_k T_up + K b S / f_s + max_k T_down) + broadcast + max_k Lam / R_f)."""
        t_iter = iteration_delay(ms_value_s, self.fixed_iteration_s[index], 0.0)
        t_round = round_delay(t_iter, self.broadcast_s[index] + fs_value_s, local_steps=self.local_steps)
        return total_delay(t_round, rounds=self.rounds[index])


@dataclass(frozen=True)
class Problem:
    """A realised scenario prepared for the search: links, downlink rates and per-pair terms."""

    realised: Realised
    ms_link: Link
    fs_link: Link
    downlink_rate_ms_bps: np.ndarray   # inf when the downlink is disabled (its terms are then 0)
    downlink_rate_fs_bps: np.ndarray
    terms: PairTerms
    ms_bits: float                     # D of the MS link: b (A + Y)

    def times(self, rank: int) -> SystemTimes:
        """b, I, E(r), f and f_s for rank r."""
        training = self.realised.scenario.training
        return SystemTimes(batch_size=training.batch_size, local_steps=training.local_steps,
                           rounds=self.realised.rounds(rank), client_flops=self.realised.client_flops,
                           server_flops=self.realised.scenario.server.flops)

    def ms_fixed_latency(self, index: int) -> np.ndarray:
        """c[k] = b F_c(l,r) / f[k] of the MS link for pair ``index``."""
        return client_forward_delays(self.terms.numbers.F_c[index],
                                     batch_size=self.realised.scenario.training.batch_size,
                                     client_flops=self.realised.client_flops)

    def fs_value(self, index, fs_per_bit_s: float):
        """max_k Lam / R_f[k] for an FS allocation whose value at D = 1 bit is ``fs_per_bit_s``."""
        return self.terms.numbers.Lam[index] * fs_per_bit_s


def build_problem(realised: Realised) -> Problem:
    """Links (A's ``Link``), downlink rates (spec §3) and every allowed pair's fixed terms (spec §4)."""
    scenario = realised.scenario
    network, training, model = scenario.network, scenario.training, scenario.model
    n0 = realised.noise_w_per_hz
    ms_link = Link(realised.gains_ms, network.ms_subchannel_hz, n0, realised.p_max_w, network.p_th_ms_w)
    fs_link = Link(realised.gains_fs, network.fs_subchannel_hz, n0, realised.p_max_w, network.p_th_fs_w)
    K = realised.num_clients
    if network.downlink.enabled:
        dl = dict(bandwidth_hz=network.downlink.bandwidth_hz, power_w=network.downlink.power_w, noise_w_per_hz=n0)
        rate_dl_ms = downlink_rates(realised.downlink_gain_ms, **dl)
        rate_dl_fs = downlink_rates(realised.downlink_gain_fs, **dl)
    else:
        rate_dl_ms = rate_dl_fs = np.full(K, np.inf)
    layers = np.array([l for l, _ in realised.pairs])
    ranks = np.array([r for _, r in realised.pairs])
    per_pair = cost_numbers(realised.profile, layers, ranks, seq_len=model.seq_len, act_bits=model.act_bits,
                            token_bits=model.token_bits, weight_bits=model.weight_bits)
    # A, Y, G do not depend on (l, r): broadcast them so every field is an array over pairs.
    numbers = CostNumbers(**{key: np.broadcast_to(np.asarray(value, dtype=float), layers.shape)
                             for key, value in vars(per_pair).items()})
    b = training.batch_size
    downlink_max = client_downlink_delays(numbers.B_c[:, None], numbers.G[:, None], batch_size=b,
                                          client_flops=realised.client_flops,
                                          downlink_rate_ms_bps=rate_dl_ms).max(axis=1)
    server = server_compute_delay(numbers.S, num_clients=K, batch_size=b, server_flops=scenario.server.flops)
    terms = PairTerms(
        pairs=realised.pairs, numbers=numbers,
        rounds=np.array([realised.rounds(r) for r in ranks], dtype=float),
        fixed_iteration_s=server + downlink_max,
        broadcast_s=broadcast_delay(numbers.Lam, downlink_rate_fs_bps=rate_dl_fs),
        local_steps=training.local_steps,
    )
    return Problem(realised=realised, ms_link=ms_link, fs_link=fs_link, downlink_rate_ms_bps=rate_dl_ms,
                   downlink_rate_fs_bps=rate_dl_fs, terms=terms,
                   ms_bits=float(activation_uplink_bits(numbers.A[0], numbers.Y[0], batch_size=b)))


# ---------------------------------------------------------------------------------------- bounds

def max_sum_rate_bps(link: Link) -> float:
    """An upper bound on sum_k R[k] for any assignment and powers: every subchannel at its best
    client's gain, min(Pth, sum_k Pmax[k]) water-filled over them."""
    usable = min(link.p_th_w, float(link.p_max_w.sum()))
    return float(link_solver.water_filling_rate(link.snr.max(axis=0), usable)) * link.bandwidth_hz


def min_max_latency_bound(c: np.ndarray, data_bits: float, sum_rate_bps: float) -> np.ndarray:
    """Lower bound on max_k (c[k] + D / R[k]) when sum_k R[k] <= SR, for each row of ``c`` (..., K).

    It is the t with sum_k D / (t - c[k]) = SR (the left side decreases in t), found by bisection
    in numpy (no scipy import on the ``sflllm optimize`` path); the returned end of the bracket is
    on the infeasible side, so it is a valid bound.
    """
    c = np.asarray(c, dtype=float)
    lo = c.max(axis=-1)
    hi = lo + c.shape[-1] * data_bits / sum_rate_bps  # each term <= SR / K here: feasible
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore"):
            feasible = np.sum(data_bits / (mid[..., None] - c), axis=-1) <= sum_rate_bps
        lo, hi = np.where(feasible, lo, mid), np.where(feasible, mid, hi)
    return lo


# ---------------------------------------------------------------------------------------- search

@dataclass
class PairSearch:
    """Best pair among ``candidates`` for a per-pair MS evaluator, with lower-bound pruning.

    ``evaluate(i)`` returns the MS link's allocation for pair i; ``lower_ms`` a lower bound on its
    value for every pair; ``monotone`` says the evaluator is exact, so a value found at one pair
    bounds the others (see the module docstring). ``cache`` (shared between searches with the same evaluator) holds
    the allocations computed so far.
    """

    problem: Problem
    evaluate: Callable[[int], LinkAllocation]
    lower_ms: np.ndarray
    fs_value: np.ndarray           # per pair: max_k Lam / R_f[k] of this method's FS allocation
    monotone: bool
    cache: dict[int, LinkAllocation] = field(default_factory=dict)

    def best(self, candidates: list[int]) -> int:
        terms = self.problem.terms
        lower = self.lower_ms.copy()
        for i, alloc in self.cache.items():
            self._raise_bounds(lower, i, alloc.value_s)
        best_index, best_total = -1, np.inf
        remaining = list(candidates)
        while remaining:
            idx = np.array(remaining)
            bounds = terms.total(idx, lower[idx], self.fs_value[idx])
            pick = int(np.argmin(bounds))
            if bounds[pick] >= best_total:
                break
            i = remaining.pop(pick)
            if i not in self.cache:
                self.cache[i] = self.evaluate(i)
            value = self.cache[i].value_s
            total = terms.total(i, value, self.fs_value[i])
            if total < best_total or (total == best_total and i < best_index):
                best_index, best_total = i, total
            self._raise_bounds(lower, i, value)
        return best_index

    @functools.cached_property
    def _seconds_per_flop(self) -> float:
        """b / min_k f[k]: the largest c[k] per FLOP of F_c (the slowest client)."""
        realised = self.problem.realised
        return realised.scenario.training.batch_size / float(realised.client_flops.min())

    def _raise_bounds(self, lower: np.ndarray, i: int, value: float) -> None:
        if self.monotone:
            # Exact value v(c) with c = F_c * b / f: non-decreasing in c, and lowering every c[k] by
            # at most delta lowers it by at most delta (spec §5's objective is max_k (c[k] + D/R[k])).
            F_c = self.problem.terms.numbers.F_c
            shortfall = np.maximum(F_c[i] - F_c, 0.0) * self._seconds_per_flop
            lower[:] = np.maximum(lower, value - shortfall)
        lower[i] = value


# --------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Solution:
    """One method's chosen pair and allocations, with every delay of spec §4.

    ``total_delay_s``, ``round_delay_s``, ``iteration_delay_s`` and ``breakdown`` are ``delay``'s own
    for a deterministic method.  For a random baseline they are means over its draws (spec §5
    "report the mean"; each quantity averaged on its own, so the mean breakdown still adds up to the
    mean T_total as spec §8 requires), while the pair, allocations and ``delay`` are its first draw's,
    shown as an example; ``draws`` is then the number of draws and ``draw_totals_s`` each draw's own
    T_total, in draw order (empty for a deterministic method).
    """

    method: str
    pair_index: int
    split_layer: int
    rank: int
    ms: LinkAllocation
    fs: LinkAllocation     # solved for D = 1 bit; owner, powers and rates hold for every D (c = 0)
    delay: DelayReport
    total_delay_s: float
    round_delay_s: float
    iteration_delay_s: float
    breakdown: dict[str, float]
    draws: int = 1
    draw_totals_s: tuple[float, ...] = ()


def _mean_over_draws(solutions: list[Solution]) -> Solution:
    """The first draw's solution with T_total, T_round, T_iter and the breakdown averaged over all draws."""

    def mean(value: Callable[[DelayReport], float]) -> float:
        return float(np.mean([value(s.delay) for s in solutions]))

    first = solutions[0]
    return replace(first, total_delay_s=mean(lambda d: d.total_delay_s), round_delay_s=mean(lambda d: d.round_delay_s),
                   iteration_delay_s=mean(lambda d: d.iteration_delay_s),
                   breakdown={key: mean(lambda d, key=key: d.breakdown[key]) for key in first.delay.breakdown},
                   draws=len(solutions), draw_totals_s=tuple(float(s.delay.total_delay_s) for s in solutions))


@dataclass(frozen=True)
class Outcome:
    """The requested method's solution, the proposed one and every baseline's T_total.

    ``solutions`` holds every method that ran (proposed, the baselines, and exact when requested).
    """

    problem: Problem
    optimiser: "Optimiser"
    solution: Solution
    proposed: Solution
    baselines: dict[str, float]
    timings_s: dict[str, float]
    solve_time_s: float
    solutions: dict[str, Solution]


def _solution(problem: Problem, method: str, index: int, ms: LinkAllocation, fs: LinkAllocation) -> Solution:
    l, r = problem.terms.pairs[index]
    numbers = CostNumbers(**{key: float(value[index]) for key, value in vars(problem.terms.numbers).items()})
    delay = evaluate_delay(numbers, problem.times(r), rate_ms_bps=ms.rate_bps, rate_fs_bps=fs.rate_bps,
                           downlink_rate_ms_bps=problem.downlink_rate_ms_bps,
                           downlink_rate_fs_bps=problem.downlink_rate_fs_bps)
    return Solution(method=method, pair_index=index, split_layer=l, rank=r, ms=ms, fs=fs, delay=delay,
                    total_delay_s=delay.total_delay_s, round_delay_s=delay.round_delay_s,
                    iteration_delay_s=delay.iteration_delay_s, breakdown=dict(delay.breakdown))


def default_fixed_split(problem: Problem) -> int:
    """baselines.fixed_split, or the allowed l nearest floor(L/2) (the smaller on a tie)."""
    chosen = problem.realised.scenario.baselines.fixed_split
    if chosen is not None:
        return chosen
    target = problem.realised.profile.num_layers // 2
    return min(problem.realised.split_layers, key=lambda l: (abs(l - target), l))


def default_fixed_rank(problem: Problem) -> int:
    """baselines.fixed_rank, or the allowed r nearest 4 (the smaller on a tie)."""
    chosen = problem.realised.scenario.baselines.fixed_rank
    if chosen is not None:
        return chosen
    return min({r for _, r in problem.terms.pairs}, key=lambda r: (abs(r - 4), r))


class Optimiser:
    """Runs the methods of spec §5 on one problem, sharing work between them."""

    def __init__(self, problem: Problem):
        self.problem = problem
        P = len(problem.terms.pairs)
        self.all_pairs = list(range(P))
        self._proposed_search: PairSearch | None = None
        self._proposed_fs: LinkAllocation | None = None  # the FS allocation of "proposed" (set with the search)
        self._ms_bound: np.ndarray | None = None

    # ---- shared pieces
    def _ms_lower_bound(self) -> np.ndarray:
        """Sum-rate lower bound on the MS link's value for any allocation, per pair."""
        if self._ms_bound is None:
            problem = self.problem
            c = np.stack([problem.ms_fixed_latency(i) for i in self.all_pairs])
            self._ms_bound = min_max_latency_bound(c, problem.ms_bits, max_sum_rate_bps(problem.ms_link))
        return self._ms_bound

    def _search(self, evaluate: Callable[[int], LinkAllocation], fs: LinkAllocation, *,
                monotone: bool) -> PairSearch:
        """A pair search of ``evaluate`` with the sum-rate bound and the FS values of allocation ``fs``."""
        return PairSearch(problem=self.problem, evaluate=evaluate, lower_ms=self._ms_lower_bound(),
                          fs_value=self.problem.fs_value(slice(None), fs.value_s), monotone=monotone)

    def _no_fixed_latency(self) -> np.ndarray:
        """c = 0: the FS link's fixed latencies."""
        return np.zeros(self.problem.realised.num_clients)

    # ---- proposed and its restrictions
    def _proposed(self) -> PairSearch:
        if self._proposed_search is None:
            problem = self.problem
            fs = link_solver.solve_link(problem.fs_link, self._no_fixed_latency(), 1.0)
            self._proposed_fs = fs
            self._proposed_search = self._search(
                lambda i: link_solver.solve_link(problem.ms_link, problem.ms_fixed_latency(i), problem.ms_bits),
                fs, monotone=False)
        return self._proposed_search

    def _restricted(self, method: str, candidates: list[int]) -> Solution:
        search = self._proposed()
        index = search.best(candidates)
        return _solution(self.problem, method, index, search.cache[index], self._proposed_fs)

    def proposed(self) -> Solution:
        return self._restricted("proposed", self.all_pairs)

    def proposed_totals(self) -> np.ndarray:
        """T_total of "proposed" at every allowed pair (evaluates every pair: for figures)."""
        search = self._proposed()
        for i in self.all_pairs:
            if i not in search.cache:
                search.cache[i] = search.evaluate(i)
        values = np.array([search.cache[i].value_s for i in self.all_pairs])
        return self.problem.terms.total(np.arange(len(values)), values, search.fs_value)

    def fixed_split(self) -> Solution:
        l_fixed = default_fixed_split(self.problem)
        return self._restricted("fixed_split", [i for i, (l, _) in enumerate(self.problem.terms.pairs) if l == l_fixed])

    def fixed_rank(self) -> Solution:
        r_fixed = default_fixed_rank(self.problem)
        return self._restricted("fixed_rank", [i for i, (_, r) in enumerate(self.problem.terms.pairs) if r == r_fixed])

    # ---- exact
    def exact(self) -> Solution:
        problem = self.problem
        check_exact_size(problem)
        try:
            fs = link_solver.solve_link_exact(problem.fs_link, self._no_fixed_latency(), 1.0)
            search = self._search(
                lambda i: link_solver.solve_link_exact(problem.ms_link, problem.ms_fixed_latency(i),
                                                       problem.ms_bits),
                fs, monotone=True)
            index = search.best(self.all_pairs)
        except link_solver.InstanceTooLarge as exc:
            raise MethodError(f"--method exact: {exc}") from None
        return _solution(problem, "exact", index, search.cache[index], fs)

    # ---- equal_power
    def equal_power(self) -> Solution:
        problem = self.problem

        def fixed_power(link: Link, c: np.ndarray, data_bits: float) -> LinkAllocation:
            owner = link_solver.greedy_assignment(link, c, data_bits)  # spec §5 step 1
            return link_solver.equal_power_allocation(link, owner, c, data_bits)

        fs = fixed_power(problem.fs_link, self._no_fixed_latency(), 1.0)
        search = self._search(lambda i: fixed_power(problem.ms_link, problem.ms_fixed_latency(i), problem.ms_bits),
                              fs, monotone=False)
        index = search.best(self.all_pairs)
        return _solution(problem, "equal_power", index, search.cache[index], fs)

    # ---- random baselines (one generator, default_rng(seed + 1): random_subchannel's draws, then random_all's)
    def random_baselines(self) -> tuple[Solution, Solution]:
        """random_subchannel and random_all (spec §5), each a mean over baselines.random_draws draws.

        Draw order (the spec names the generator, not the order; this is the reading taken): one
        ``default_rng(seed + 1)``; first every random_subchannel draw (MS assignment, then FS
        assignment); then per random_all draw: MS assignment, FS assignment, l (uniform over the
        allowed split layers), then r (uniform over the ranks allowed with that l).  Each assignment
        is :func:`link_solver.random_assignment`.
        """
        problem = self.problem
        realised = problem.realised
        rng = np.random.default_rng(realised.scenario.seed + 1)
        K, M, N = realised.num_clients, problem.ms_link.num_subchannels, problem.fs_link.num_subchannels
        draws = realised.scenario.baselines.random_draws
        zeros = self._no_fixed_latency()

        subchannel: list[Solution] = []
        for _ in range(draws):
            owner_ms = link_solver.random_assignment(rng, K, M)  # per draw: MS, then FS assignment
            owner_fs = link_solver.random_assignment(rng, K, N)
            fs = link_solver.power_control(problem.fs_link, owner_fs, zeros, 1.0)
            search = self._search(
                lambda i, o=owner_ms: link_solver.power_control(problem.ms_link, o, problem.ms_fixed_latency(i),
                                                                problem.ms_bits),
                fs, monotone=True)
            index = search.best(self.all_pairs)
            subchannel.append(_solution(problem, "random_subchannel", index, search.cache[index], fs))

        layers = realised.split_layers
        everything: list[Solution] = []
        for _ in range(draws):
            owner_ms = link_solver.random_assignment(rng, K, M)
            owner_fs = link_solver.random_assignment(rng, K, N)
            l = layers[int(rng.integers(len(layers)))]
            # "random r in Rset": among the ranks allowed with l (the memory limit may exclude some).
            ranks = [r for (pl, r) in problem.terms.pairs if pl == l]
            r = ranks[int(rng.integers(len(ranks)))]
            index = problem.terms.pairs.index((l, r))
            ms = link_solver.equal_power_allocation(problem.ms_link, owner_ms, problem.ms_fixed_latency(index),
                                                    problem.ms_bits)
            fs = link_solver.equal_power_allocation(problem.fs_link, owner_fs, zeros, 1.0)
            everything.append(_solution(problem, "random_all", index, ms, fs))

        return _mean_over_draws(subchannel), _mean_over_draws(everything)


#: Largest number of subchannels on one link, and of clients times subchannels on one link, that
#: ``optimise`` accepts.  Measured on a 2-core machine: 2 clients with 10,000 subchannels take about
#: 6 s of CPU and 0.45 GB (each client then owns ~5,000, and the local search water-fills a few
#: hundred rows that long per pass); 1,000 clients with 2,730 subchannels (2.7 million per link)
#: take about 3 s and 0.6 GB (the realised gains are written out in full, spec §8).  Past these the
#: time and memory grow quickly (10^5 subchannels did not finish), so such a scenario is refused
#: before any work.
MAX_SUBCHANNELS = 10_000
MAX_CLIENT_SUBCHANNELS = 4_000_000


def check_size(scenario: Scenario) -> None:
    """Refuse a scenario larger than ``optimise`` handles in seconds (``MAX_SUBCHANNELS``,
    ``MAX_CLIENT_SUBCHANNELS``), naming the field; call before :func:`realise` (which draws K x M gains)."""
    K = scenario.clients.count
    for field_name in ("network.ms_subchannels", "network.fs_subchannels"):
        M = getattr(scenario.network, field_name.split(".")[1])
        if M > MAX_SUBCHANNELS:
            raise MethodError(f"{field_name}: {M} subchannels is more than the optimiser handles "
                              f"(at most {MAX_SUBCHANNELS:,} per link); lower it")
        if K * M > MAX_CLIENT_SUBCHANNELS:
            raise MethodError(f"{field_name}: {M} subchannels for clients.count = {K} clients is more than the "
                              f"optimiser handles (at most {MAX_CLIENT_SUBCHANNELS:,} clients x subchannels per "
                              "link); lower either")


def check_exact_size(problem: Problem) -> None:
    """Refuse ``--method exact`` on a link too large for the exact solver, naming the scenario fields."""
    K = problem.realised.num_clients
    for field_name, link in (("network.ms_subchannels", problem.ms_link), ("network.fs_subchannels", problem.fs_link)):
        M = link.num_subchannels
        if not link_solver.exact_size_ok(K, M):
            raise MethodError(
                f"--method exact: {field_name} = {M} with clients.count = {K} is too large to solve exactly "
                f"(K*3^M = {link_solver.exact_work(K, M):.3g} steps per test, limit "
                f"{link_solver.EXACT_MAX_WORK:.3g}: {_exact_hint(K)}); use --method proposed")


def _exact_hint(K: int) -> str:
    """What the exact solver accepts with K clients; every client needs a subchannel (M >= K)."""
    most = max((m for m in range(K, 64) if link_solver.exact_size_ok(K, m)), default=None)
    if most is not None:
        return f"at most {most} subchannels for {K} clients"
    clients = max(k for k in range(1, 64) if link_solver.exact_size_ok(k, k))
    return f"{K} clients need {K} subchannels at least, too many; at most {clients} clients can be solved exactly"


def phases(method: str = "proposed") -> tuple[str, ...]:
    """The phases :func:`optimise` runs for ``method``, in order (the keys of ``Outcome.timings_s``)."""
    exact = ("exact",) if method == "exact" else ()
    return ("build_problem", "proposed", *exact, "fixed_split", "fixed_rank", "equal_power", "random")


def optimise(realised: Realised, method: str = "proposed", *,
             on_phase: Callable[[str], None] | None = None) -> Outcome:
    """Run ``method`` and every baseline (spec §5); the solution reported is ``method``'s.

    A random baseline's solution shows its first draw; its delays are means over draws (``Solution``).
    ``on_phase(name)`` is called as each of :func:`phases` starts (e.g. to show progress).
    """
    if method not in METHODS:
        raise MethodError(f"--method: unknown method {method!r} (choose one of {', '.join(METHODS)})")
    check_size(realised.scenario)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, run: Callable):
        if on_phase is not None:
            on_phase(name)
        tic = time.perf_counter()
        value = run()
        timings[name] = time.perf_counter() - tic
        return value

    problem = timed("build_problem", lambda: build_problem(realised))
    if method == "exact":
        check_exact_size(problem)  # before any work
    optimiser = Optimiser(problem)
    proposed = timed("proposed", optimiser.proposed)
    solutions = {"proposed": proposed}
    if method == "exact":
        solutions["exact"] = timed("exact", optimiser.exact)
    solutions["fixed_split"] = timed("fixed_split", optimiser.fixed_split)
    solutions["fixed_rank"] = timed("fixed_rank", optimiser.fixed_rank)
    solutions["equal_power"] = timed("equal_power", optimiser.equal_power)
    solutions["random_subchannel"], solutions["random_all"] = timed("random", optimiser.random_baselines)
    baselines = {name: solutions[name].total_delay_s for name in BASELINES}
    return Outcome(problem=problem, optimiser=optimiser, solution=solutions[method], proposed=proposed,
                   baselines=baselines, timings_s=timings, solve_time_s=time.perf_counter() - start,
                   solutions=solutions)
