"""One uplink's subchannel assignment and power control (spec §5, the per-link problem).

For a fixed split layer and rank, the MS link and the FS link each pose the problem

    min over owner x and powers p of  max_k ( c[k] + D / R[k] )

subject to the assignment and power constraints of spec §3.  This module solves it:

* :func:`power_control` -- exact optimum for a fixed assignment (spec §5 step 2);
* :func:`greedy_assignment` -- the greedy subchannel allocation (spec §5 step 1, and step 3's re-run);
* :func:`solve_link` -- the "proposed" heuristic: steps 1-3 plus a local search;
* :func:`solve_link_exact` -- the global optimum for small instances (bounds the gap of "proposed");
* :func:`equal_power`, :func:`random_assignment` -- the baselines' building blocks.

numpy only.  Throughout, ``snr[k, i] = g[k][i] / (N0 * W)`` is client k's signal-to-noise
ratio per watt on subchannel i, so that a subchannel carries ``W * log2(1 + p * snr)`` bit/s.

Water-filling facts used below (both have a closed form over the sorted active set).  For
subchannels with snr a_1 >= a_2 >= ... the power-optimal split is p_i = (mu - 1/a_i)^+ with
water level mu, and the active set is a prefix {1..m}:

* rate from a power budget P ("forward"):  mu_m = (P + sum_{i<=m} 1/a_i) / m, and m is the number
  of prefixes with mu_m * a_m > 1; the rate is W * (m * log2(mu) + sum_{i<=m} log2 a_i).
* minimum power for a rate of rho bit/s/Hz ("inverse"):  log2 mu_m = (rho - sum_{i<=m} log2 a_i) / m,
  m again the number of prefixes with mu_m * a_m > 1; the power is m * mu - sum_{i<=m} 1/a_i.

(If mu_m * a_{m+1} > 1 then also mu_{m+1} * a_{m+1} > 1 and conversely, so the prefixes that pass
the test are exactly 1..m* and counting them finds m*.)
"""

from __future__ import annotations

import functools
import math
from bisect import insort
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EXACT_MAX_WORK",
    "InstanceTooLarge",
    "Link",
    "LinkAllocation",
    "equal_power",
    "equal_power_allocation",
    "exact_size_ok",
    "exact_work",
    "greedy_assignment",
    "power_control",
    "random_assignment",
    "rates",
    "solve_link",
    "solve_link_exact",
    "water_filling_rate",
]

#: solve_link_exact refuses instances with K * 3**M above this (the subset DP's work per feasibility
#: test): M <= 12 with K <= 4, M <= 11 with K <= 12, M <= 10 with K <= 37.  About 0.1-1 s each.
EXACT_MAX_WORK = 2_200_000

#: spec §5 step 3: at most this many alternation passes.
MAX_ALTERNATION_PASSES = 10

#: local search budget (see :func:`_neighbourhood`, :func:`_local_search`): instances with at most
#: LOCAL_SEARCH_FULL moves + swaps score all of them, larger ones the LOCAL_SEARCH_SCREENED most
#: promising moves and as many swaps; exact power controls of single neighbours per pass; passes
#: (full / screened); instances with at most LOCAL_SEARCH_RESTART_MAX neighbours get that many
#: random restarts.  See :func:`solve_link`.
LOCAL_SEARCH_FULL = 2048
LOCAL_SEARCH_SCREENED = 256
LOCAL_SEARCH_EXACT_PER_PASS = 2
LOCAL_SEARCH_MAX_PASSES = 100
LOCAL_SEARCH_MAX_PASSES_SCREENED = 3
LOCAL_SEARCH_RESTART_MAX = 128
# 8 rather than 4: on 1,100 c = 0 instances (the FS link's shape; K 2-4, M <= 8) 4 restarts left
# 5 instances above 0.01% of the optimum, the worst 3.6%; 8 left none (worst 0.000%).  Only small
# instances restart, so the K = 50 command's time is unchanged.
LOCAL_SEARCH_RESTARTS = 8

_REL_IMPROVEMENT = 1e-12  # an objective must drop by this relative amount to count as progress
_NEWTON_MAX_STEPS = 100  # power_control's Newton iteration converges in well under 10 steps


class InstanceTooLarge(ValueError):
    """The exact solver was asked for an instance too large to enumerate in reasonable time."""


def exact_work(K: int, M: int) -> int:
    """K * 3^M: the subset DP's work per feasibility test of :func:`solve_link_exact`."""
    return K * 3**M


def exact_size_ok(K: int, M: int) -> bool:
    """Whether :func:`solve_link_exact` accepts K clients and M subchannels (work <= EXACT_MAX_WORK)."""
    return exact_work(K, M) <= EXACT_MAX_WORK


@dataclass(frozen=True, eq=False)
class Link:
    """One uplink (MS or FS) of spec §3.

    gains: (K, M) linear power gains g[k][i]; bandwidth_hz: W per subchannel; noise_w_per_hz: N0;
    p_max_w: (K,) per-client power budget on this link; p_th_w: the link's total power budget.
    """

    gains: np.ndarray
    bandwidth_hz: float
    noise_w_per_hz: float
    p_max_w: np.ndarray
    p_th_w: float

    def __post_init__(self) -> None:
        gains = np.asarray(self.gains, dtype=float)
        if gains.ndim != 2:
            raise ValueError(f"Link.gains must be a (K, M) matrix, got shape {gains.shape}")
        k, m = gains.shape
        if k < 1:
            raise ValueError("Link.gains has no clients (K = 0)")
        if k > m:
            raise ValueError(
                f"Link.gains: K = {k} clients but only M = {m} subchannels; every client needs one (K <= M)"
            )
        if not np.all(np.isfinite(gains)) or np.any(gains <= 0):
            raise ValueError("Link.gains must be finite and positive")
        for name in ("bandwidth_hz", "noise_w_per_hz", "p_th_w"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Link.{name} must be finite and positive, got {value}")
            object.__setattr__(self, name, value)
        p_max = np.asarray(self.p_max_w, dtype=float)
        if p_max.shape != (k,):
            raise ValueError(f"Link.p_max_w must have shape ({k},) to match gains, got {p_max.shape}")
        if not np.all(np.isfinite(p_max)) or np.any(p_max <= 0):
            raise ValueError("Link.p_max_w must be finite and positive")
        object.__setattr__(self, "gains", gains)
        object.__setattr__(self, "p_max_w", p_max)

    @property
    def num_clients(self) -> int:
        return self.gains.shape[0]

    @property
    def num_subchannels(self) -> int:
        return self.gains.shape[1]

    @functools.cached_property
    def snr(self) -> np.ndarray:
        """(K, M) SNR per watt, g / (N0 * W)."""
        return self.gains / (self.noise_w_per_hz * self.bandwidth_hz)

    @functools.cached_property
    def snr_by_subchannel(self) -> np.ndarray:
        """(M, K) snr, subchannel-major (the local search's screening reads it by subchannel)."""
        return np.ascontiguousarray(self.snr.T)

    @functools.cached_property
    def preference(self) -> "_Preference":
        """Each client's subchannels by decreasing snr (lowest index first on ties), for
        :func:`greedy_assignment`; sorted lazily, a prefix per client at a time."""
        return _Preference(self.snr)


def _stable_top(rows: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` column indices of each row's ``argsort(-rows, kind="stable")`` (largest
    value first, lowest index first on ties), at O(M) per row instead of a full sort."""
    m = rows.shape[1]
    neg = -rows
    if count >= m:
        return np.argsort(neg, axis=1, kind="stable")
    kth = np.partition(neg, count - 1, axis=1)[:, count - 1 : count]
    pick = neg <= kth
    over = np.flatnonzero(pick.sum(axis=1) > count)  # rows with ties at the cut: lowest indices first
    if over.size:
        ahead, tied = neg[over] < kth[over], neg[over] == kth[over]
        pick[over] = ahead | (tied & (np.cumsum(tied, axis=1) <= count - ahead.sum(axis=1, keepdims=True)))
    cols = np.nonzero(pick)[1].reshape(rows.shape[0], count)  # ascending index within each row
    return np.take_along_axis(cols, np.argsort(np.take_along_axis(neg, cols, axis=1), axis=1, kind="stable"), axis=1)


class _Preference:
    """Prefixes of each client's subchannels by decreasing snr, as plain lists (the greedy walks them
    once per subchannel handed out).  Every client starts with a prefix of 32 plus four times its
    fair share M/K (shorter ones made a third of the greedy's time at K = 1,000, M = 2,730 go to
    extending them); one that runs out gets a prefix twice as long (at most the whole row)."""

    def __init__(self, snr: np.ndarray):
        k, m = snr.shape
        self._snr = snr
        self.order, self.value = self._prefix(snr, min(m, 32 + 4 * (-(-m // k))))

    @staticmethod
    def _prefix(rows: np.ndarray, count: int) -> tuple[list[list[int]], list[list[float]]]:
        order = _stable_top(rows, count)
        return order.tolist(), np.take_along_axis(rows, order, axis=1).tolist()

    def extend(self, client: int) -> None:
        """Double ``client``'s prefix (it has walked past its end)."""
        row = self._snr[client : client + 1]
        order, value = self._prefix(row, min(row.shape[1], 2 * len(self.order[client])))
        self.order[client], self.value[client] = order[0], value[0]


@dataclass(frozen=True, eq=False)
class LinkAllocation:
    """An assignment with powers and what it achieves on one link."""

    owner: np.ndarray  # (M,) int, owner client of each subchannel
    power_w: np.ndarray  # (M,)
    rate_bps: np.ndarray  # (K,)
    latency_s: np.ndarray  # (K,) c[k] + D/R[k]
    value_s: float  # max_k latency_s


# ----------------------------------------------------------------------------------------------
# validation


def _check_owner(link: Link, owner) -> np.ndarray:
    owner = np.asarray(owner)
    k, m = link.gains.shape
    if owner.shape != (m,):
        raise ValueError(f"owner must have shape ({m},) (one client per subchannel), got {owner.shape}")
    if owner.size and not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"owner must hold integer client indices, got dtype {owner.dtype}")
    if np.any(owner < 0) or np.any(owner >= k):
        raise ValueError(f"owner holds client indices outside 0..{k - 1}")
    counts = np.bincount(owner, minlength=k)
    if np.any(counts == 0):
        raise ValueError(f"owner leaves client(s) {np.flatnonzero(counts == 0).tolist()} without a subchannel")
    return owner.astype(np.intp)


def _check_demand(link: Link, c, data_bits) -> tuple[np.ndarray, float]:
    c = np.asarray(c, dtype=float)
    if c.shape != (link.num_clients,):
        raise ValueError(f"c must have shape ({link.num_clients},) (one per client), got {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("c (per-client fixed latency) must be finite and non-negative")
    data_bits = float(data_bits)
    if not (math.isfinite(data_bits) and data_bits > 0):
        raise ValueError(f"D (bits to send) must be finite and positive, got {data_bits}")
    return c, data_bits


# ----------------------------------------------------------------------------------------------
# water-filling on rows of descending-sorted snr, padded with zeros (= not owned)


def _prefix_sums(sorted_snr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix sums of log2 a and 1/a over the last axis, and the valid (owned) mask."""
    valid = sorted_snr > 0
    safe = np.where(valid, sorted_snr, 1.0)
    cum_log = np.cumsum(np.where(valid, np.log2(safe), 0.0), axis=-1)
    cum_inv = np.cumsum(np.where(valid, 1.0 / safe, 0.0), axis=-1)
    return valid, cum_log, cum_inv


def _at_last(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[..., index[...]]`` row by row on the last axis (``take_along_axis`` without its overhead)."""
    if values.shape[:-1] != index.shape:
        values = np.broadcast_to(values, index.shape + values.shape[-1:])
    flat = values.reshape(-1, values.shape[-1])
    return flat[np.arange(flat.shape[0]), index.reshape(-1)].reshape(index.shape)


class _Rows:
    """Descending-sorted snr rows with their prefix sums, for repeated water-filling."""

    def __init__(self, sorted_snr: np.ndarray):
        self.snr = sorted_snr
        self.valid, self.cum_log, self.cum_inv = _prefix_sums(sorted_snr)
        self.log_snr = np.log2(np.where(self.valid, sorted_snr, 1.0))
        self.count = np.arange(1, sorted_snr.shape[-1] + 1, dtype=float)

    def min_power(self, bits_per_hz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse water-filling: minimum total power reaching ``bits_per_hz`` on each row, and mu.

        Rows with no owned subchannel get infinite power; a zero demand costs zero power.
        """
        rho = np.asarray(bits_per_hz, dtype=float)[..., None]
        with np.errstate(over="ignore", invalid="ignore"):
            log_mu = (rho - self.cum_log) / self.count
            active = self.valid & (log_mu + self.log_snr > 0)
            m = active.sum(axis=-1)
            idx = np.maximum(m - 1, 0)
            mu = np.exp2(_at_last(log_mu, idx))
            power = m * mu - _at_last(self.cum_inv, idx)
        power = np.where(m > 0, np.maximum(power, 0.0), 0.0)
        power = np.where(self.valid[..., 0] | (rho[..., 0] <= 0), power, np.inf)
        return power, np.where(m > 0, mu, 0.0)

    def max_rate(self, power_w: np.ndarray) -> np.ndarray:
        """Forward water-filling: the largest rate (bit/s/Hz) of each row with ``power_w`` spread."""
        budget = np.asarray(power_w, dtype=float)[..., None]
        mu = (budget + self.cum_inv) / self.count
        active = self.valid & (mu * np.where(self.valid, self.snr, 1.0) > 1)
        m = active.sum(axis=-1)
        idx = np.maximum(m - 1, 0)
        with np.errstate(divide="ignore"):
            bits = m * np.log2(_at_last(mu, idx)) + _at_last(self.cum_log, idx)
        return np.where(m > 0, bits, 0.0)


def _owned_rows(snr: np.ndarray, owner: np.ndarray) -> _Rows:
    """Each client's owned snr, sorted descending, padded with zeros to the largest ownership.

    Sorts the M owned values by (client, decreasing snr) and scatters them, rather than sorting K
    masked rows of length M.
    """
    counts = np.bincount(owner, minlength=snr.shape[0])
    own = snr[owner, np.arange(owner.size)]
    order = np.lexsort((-own, owner))
    rank = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)  # place within its row
    rows = np.zeros((snr.shape[0], int(counts.max())))
    rows[owner[order], rank] = own[order]
    result = _Rows(rows)
    result.place = np.empty(owner.size, dtype=np.intp)  # each subchannel's column in its owner's row
    result.place[order] = rank
    return result


# ----------------------------------------------------------------------------------------------
# public building blocks


def water_filling_rate(snr, power_w) -> np.ndarray:
    """Largest spectral efficiency (bit/s/Hz) of each row of ``snr`` with ``power_w`` water-filled over it.

    ``snr`` (..., M): SNR per watt of the subchannels one sender may use (0 = not usable), in any
    order; ``power_w`` (...,): each row's power budget.  This is the "forward" water-filling of the
    module docstring; times W it is the largest rate (spec §3) those subchannels can carry.
    """
    snr = np.asarray(snr, dtype=float)
    return _Rows(-np.sort(-snr, axis=-1)).max_rate(power_w)


def rates(link: Link, owner, power) -> np.ndarray:
    """Per-client uplink rates R[k] in bit/s for an assignment and per-subchannel powers (spec §3)."""
    owner = _check_owner(link, owner)
    power = np.asarray(power, dtype=float)
    if power.shape != owner.shape:
        raise ValueError(f"power must have shape {owner.shape} (one per subchannel), got {power.shape}")
    if not np.all(np.isfinite(power)) or np.any(power < 0):
        raise ValueError("power must be finite and non-negative")
    return _rates(link, owner, power)


def _rates(link: Link, owner: np.ndarray, power: np.ndarray) -> np.ndarray:
    """:func:`rates` for inputs already checked (the solvers' own assignments and powers)."""
    per_subchannel = link.bandwidth_hz * np.log2(1.0 + power * link.snr[owner, np.arange(owner.size)])
    return np.bincount(owner, weights=per_subchannel, minlength=link.num_clients)


def _allocation(link: Link, owner: np.ndarray, power: np.ndarray, c: np.ndarray, data_bits: float) -> LinkAllocation:
    rate = _rates(link, owner, power)
    with np.errstate(divide="ignore"):
        latency = c + data_bits / rate
    return LinkAllocation(
        owner=owner.copy(), power_w=power, rate_bps=rate, latency_s=latency, value_s=float(latency.max())
    )


def _fit_budgets(link: Link, owner: np.ndarray, power: np.ndarray) -> np.ndarray:
    """Scale powers down (by a hair, after rounding) so no per-client or link budget is exceeded."""
    k = link.num_clients
    per_client = np.bincount(owner, weights=power, minlength=k)
    over = per_client > link.p_max_w
    if np.any(over):
        factor = np.where(over, link.p_max_w / np.where(over, per_client, 1.0) * (1 - 4e-16), 1.0)
        power = power * factor[owner]
    total = power.sum()
    if total > link.p_th_w:
        power = power * (link.p_th_w / total * (1 - 4e-16))
    return power


def _bits_per_hz(link: Link, c: np.ndarray, data_bits: float, t: float) -> np.ndarray:
    """Spectral efficiency each client needs for latency t: D / (W (t - c[k])); inf if t <= c[k]."""
    with np.errstate(divide="ignore"):
        return np.where(t > c, data_bits / (link.bandwidth_hz * (t - c)), np.inf)


def power_control(link: Link, owner, c, D) -> LinkAllocation:
    """Exact optimal powers for a fixed assignment (spec §5 step 2).

    Solves min t s.t. c[k] + D/R[k] <= t, per-client sums <= Pmax[k], link sum <= Pth.  Each client
    alone can reach t_k = c[k] + D / R_k(min(Pmax[k], Pth)) (forward water-filling); if the minimum
    powers at t_lo = max_k t_k fit within Pth, t_lo is optimal (Pmax binds).  Otherwise Pth binds and
    t* solves f(t) = sum_k P_k(t) - Pth = 0, P_k(t) the inverse water-filling power for rate
    rho_k = D / (W (t - c[k])).  P_k is convex increasing in rho_k and rho_k convex decreasing in t,
    so f is convex and decreasing: Newton's method from t_lo (where f > 0) climbs monotonically to
    t* without overshooting, quadratically; f'(t) = -sum_k mu_k ln2 rho_k / (t - c[k]).
    Every client is given its minimum power for t*, so all latencies equal t* (up to rounding); the
    powers are then scaled down by a hair where rounding would exceed a budget.
    """
    return _power_control(link, _check_owner(link, owner), *_check_demand(link, c, D))


def _power_control(link: Link, owner: np.ndarray, c: np.ndarray, data_bits: float) -> LinkAllocation:
    """:func:`power_control` for inputs already checked (the solvers call it many times per instance)."""
    rows = _owned_rows(link.snr, owner)
    alone = c + data_bits / (link.bandwidth_hz * rows.max_rate(np.minimum(link.p_max_w, link.p_th_w)))
    t = float(alone.max())
    for _ in range(_NEWTON_MAX_STEPS):
        rho = _bits_per_hz(link, c, data_bits, t)
        powers, mu = rows.min_power(rho)
        excess = powers.sum() - link.p_th_w
        if excess <= 0:
            break
        slope = -np.sum(mu * np.log(2.0) * rho / (t - c))
        step = -excess / slope
        if not step > t * 1e-16:  # converged to rounding (step <= 0 or nan cannot happen otherwise)
            break
        t += step
    snr_own = link.snr[owner, np.arange(owner.size)]
    power = np.maximum(mu[owner] - 1.0 / snr_own, 0.0)
    return _allocation(link, owner, _fit_budgets(link, owner, power), c, data_bits)


def equal_power(link: Link, owner) -> np.ndarray:
    """The equal_power baseline (spec §5): Pmax[k] spread equally, all scaled down to fit Pth."""
    owner = _check_owner(link, owner)
    counts = np.bincount(owner, minlength=link.num_clients)
    power = (link.p_max_w / counts)[owner]
    return _fit_budgets(link, owner, power)


def equal_power_allocation(link: Link, owner, c, D) -> LinkAllocation:
    """An assignment with the equal_power baseline's powers (:func:`equal_power`), and what it achieves."""
    owner = _check_owner(link, owner)
    c, data_bits = _check_demand(link, c, D)
    return _allocation(link, owner, equal_power(link, owner), c, data_bits)


class _ClientRate:
    """One client's forward water-filling (scalar form of :meth:`_Rows.max_rate`) as the greedy hands
    it subchannels.

    The greedy gives a client its best free subchannel each time, so the client's snr arrive in
    non-increasing order: each is appended to the sorted list.  Appending does not change the water
    level of a shorter prefix, so the active prefix (the prefixes with mu_m a_m > 1, module
    docstring) only grows while every prefix so far passes, and is fixed once one fails: O(1) per
    subchannel, with the same running sums (and so the same floats) as a pass over the whole list.
    """

    __slots__ = ("budget_w", "count", "inv_sum", "log_sum", "bits", "closed")

    def __init__(self, budget_w: float):
        self.budget_w = budget_w
        self.count = 0
        self.inv_sum = self.log_sum = self.bits = 0.0
        self.closed = False  # a prefix failed: later (weaker) subchannels stay inactive

    def add(self, snr: float) -> None:
        if self.closed:
            return
        self.count += 1
        self.inv_sum += 1.0 / snr
        mu = (self.budget_w + self.inv_sum) / self.count
        if mu * snr <= 1.0:
            self.closed = True
            return
        self.log_sum += math.log2(snr)
        self.bits = self.count * math.log2(mu) + self.log_sum


def greedy_assignment(link: Link, c, D, budget_w=None) -> np.ndarray:
    """Greedy subchannel allocation (spec §5 step 1); returns the (M,) owner array.

    Clients in decreasing c[k] (lowest index on ties) each take their best remaining subchannel.
    Then, while subchannels remain, the straggler -- largest c[k] + D/R[k] with ``budget_w[k]``
    water-filled over its current subchannels, lowest index on ties -- takes the remaining subchannel
    that raises its rate most, which is its largest-gain remaining one (the water-filled rate is
    non-decreasing in the added subchannel's gain, so this is always a maximiser).

    ``budget_w`` defaults to Pmax (step 1; Pth ignored).  Step 3 passes each client's total power in
    the current solution instead: exact power control equalises every latency at t*, so those
    latencies cannot order stragglers, but the powers they were reached with can.
    """
    c, data_bits = _check_demand(link, c, D)
    k, m = link.gains.shape
    budget = link.p_max_w if budget_w is None else np.asarray(budget_w, dtype=float)
    if budget.shape != (k,) or not np.all(np.isfinite(budget)) or np.any(budget < 0):
        raise ValueError(f"budget_w must be ({k},) finite non-negative powers, got shape {budget.shape}")
    preference = link.preference
    owner = np.full(m, -1, dtype=np.intp)
    free = [True] * m
    cursor = [0] * k  # each client's first position in its preference that may still be free
    rate = [_ClientRate(float(b)) for b in budget.tolist()]
    c_list = c.tolist()

    def take(client: int) -> None:
        """Give ``client`` its best free subchannel (its largest snr, lowest index on ties)."""
        n = cursor[client]
        while True:
            mine = preference.order[client]
            while n < len(mine) and not free[mine[n]]:
                n += 1
            if n < len(mine):
                break
            preference.extend(client)
        j, cursor[client] = mine[n], n + 1
        owner[j], free[j] = client, False
        rate[client].add(preference.value[client][n])

    def latency(client: int) -> float:
        bits = rate[client].bits
        return c_list[client] + data_bits / (link.bandwidth_hz * bits) if bits > 0 else math.inf

    for client in np.argsort(-c, kind="stable").tolist():
        take(client)
    lat = np.array([latency(i) for i in range(k)])
    for _ in range(m - k):
        straggler = int(np.argmax(lat))
        take(straggler)
        lat[straggler] = latency(straggler)
    return owner


def random_assignment(rng: np.random.Generator, K: int, M: int) -> np.ndarray:
    """Uniform random owners, redrawn until every client owns a subchannel (spec §5 baselines).

    Each draw is ``rng.integers(0, K, size=M)`` (numpy is asked for many at once, giving the same
    draws and generator state: :func:`_redraw_until_covering`).  When K is close to M almost no draw
    covers every client (K = M = 20 succeeds with probability 2e-8, K = 50 and M = 64 with 1e-6), so when the
    chance is below 1e-3 an exact sequential sampler of the same distribution (uniform over the
    assignments that cover every client) is used instead; it needs no rejection.  (Reading of the
    spec's "redrawn until every client owns one": the distribution is what it fixes; there the
    draws themselves differ from the literal loop's, which would not finish in reasonable time.)
    """
    if not (isinstance(K, (int, np.integer)) and isinstance(M, (int, np.integer))) or K < 1 or M < 1:
        raise ValueError(f"random_assignment needs positive integers K and M, got K={K!r}, M={M!r}")
    if K > M:
        raise ValueError(f"random_assignment: K = {K} clients cannot each own one of M = {M} subchannels")
    K, M = int(K), int(M)
    chance = math.exp(_log_covering(K, M)[M, K])
    if chance < 1e-3:
        return _uniform_covering(rng, K, M)
    if chance >= 0.25:  # a few redraws at most: numpy's per-call cost is below the batching's
        return _plain_redraw(rng, K, M)
    return _redraw_until_covering(rng, K, M, batch=min(int(2 / chance) + 1, 4096))


def _plain_redraw(rng: np.random.Generator, K: int, M: int) -> np.ndarray:
    """The spec's loop: ``rng.integers(0, K, size=M)`` until every client owns a subchannel."""
    while True:
        owner = rng.integers(0, K, size=M)
        if np.bincount(owner, minlength=K).min() > 0:
            return owner


def _covers(owners: np.ndarray, K: int) -> np.ndarray:
    """Whether each row of an (n, M) array of owners gives every one of the K clients a subchannel."""
    n = owners.shape[0]
    counts = np.bincount((owners + K * np.arange(n)[:, None]).ravel(), minlength=n * K)
    return counts.reshape(n, K).all(axis=1)


def _pcg_after(bitgen, start: dict, halves: int) -> dict:
    """The state of a PCG64 generator at ``start`` after ``halves`` 32-bit draws.

    numpy's 32-bit draws take the low half of a 64-bit output and keep the high half (``uinteger``,
    flagged by ``has_uint32``) for the next one.
    """
    if start["has_uint32"]:
        halves -= 1
    if halves == 0:
        return {**start, "has_uint32": 0}
    copy = type(bitgen)()
    copy.state = start
    copy.advance((halves + 1) // 2 - 1)
    last = int(copy.random_raw())
    return {**copy.state, "has_uint32": halves % 2, "uinteger": last >> 32}


def _redraw_until_covering(rng: np.random.Generator, K: int, M: int, batch: int) -> np.ndarray:
    """``rng.integers(0, K, size=M)`` redrawn until it covers every client: the same draws and the
    same final generator state as that loop, with ``batch`` draws per numpy call.

    numpy draws each integer below 2^32 from one 32-bit half of the generator's output stream (see
    :func:`_pcg_after`), whatever the call boundaries, and takes one more half only when it rejects a
    value (probability < K / 2^32).  So a call of ``batch`` rows that took exactly batch * M halves --
    checked against the generator's state -- holds the loop's draws, and the loop stops after the
    first covering row j, having taken (j + 1) * M halves.  Otherwise (a rejection, or a generator
    other than PCG64) the plain loop runs from the same start.

    This relies on numpy's PCG64 internals (the buffered 32-bit half); tests compare it with the
    plain loop, final generator state included, over many seeds and shapes.  It is kept because it
    is where the time goes at scale: at K = 50, M = 128 a draw takes 0.4 ms instead of 1.2 ms, and a
    run makes 80 draws (about 10% of the whole K = 50 command).
    """
    bitgen = rng.bit_generator
    if type(bitgen) in (np.random.PCG64, np.random.PCG64DXSM):
        while True:
            start = bitgen.state
            owners = rng.integers(0, K, size=(batch, M))
            if _pcg_after(bitgen, start, batch * M) != bitgen.state:
                bitgen.state = start
                break
            covering = np.flatnonzero(_covers(owners, K))
            if covering.size:
                bitgen.state = _pcg_after(bitgen, start, (int(covering[0]) + 1) * M)
                return owners[covering[0]]
    return _plain_redraw(rng, K, M)


@functools.lru_cache(maxsize=4)
def _log_covering(K: int, M: int) -> np.ndarray:
    """(M + 1, K + 1) table of log q(r, u), q(r, u) = N(r, u) / K^r, where N(r, u) counts the ways to
    give r more subchannels to K clients so that u given ones each get one.

    N(r, u) = u N(r-1, u-1) + (K - u) N(r-1, u): the next subchannel goes to one of the u clients
    still uncovered or to one of the others; N(0, 0) = 1 and N(0, u) = 0 for u > 0.  So q(r, u) is the
    chance that r uniform owners cover u given clients, and q(r, u) = (u/K) q(r-1, u-1) + (1 - u/K)
    q(r-1, u).  Kept in logs: q(M, K) underflows a float at K = M = 1,000 (it is K!/K^K).  (An exact
    integer table held numbers of up to M log2 K bits: 5 GB and 50 s at K = 1,000, M = 2,730; these
    floats agree with it to about 1e-13 relative, so a draw compared with them could differ only when
    a uniform lands that close to the threshold.)
    """
    u = np.arange(K + 1, dtype=float)
    with np.errstate(divide="ignore"):
        log_new, log_old = np.log(u[1:] / K), np.log(1.0 - u / K)
    table = np.full((M + 1, K + 1), -np.inf)
    table[0, 0] = 0.0
    for r in range(1, M + 1):
        prev = table[r - 1]
        table[r, 0] = 0.0
        table[r, 1:] = np.logaddexp(log_new + prev[:-1], log_old[1:] + prev[1:])
    return table


@functools.lru_cache(maxsize=4)
def _new_client_chance(K: int, M: int) -> np.ndarray:
    """(M + 1, K + 1) table: with r subchannels left and u clients uncovered, the chance that the next
    subchannel goes to an uncovered client, u N(r-1, u-1) / N(r, u) = (u/K) q(r-1, u-1) / q(r, u)
    (0 where u = 0 or the state cannot occur)."""
    log_q = _log_covering(K, M)
    u = np.arange(1, K + 1, dtype=float)
    chance = np.zeros((M + 1, K + 1))
    with np.errstate(invalid="ignore"):
        ratio = np.exp(np.log(u / K) + log_q[:-1, :-1] - log_q[1:, 1:])
    chance[1:, 1:] = np.where(np.isfinite(log_q[1:, 1:]), ratio, 0.0)
    return chance


class _ScalarDraws:
    """``Generator.random()`` and ``Generator.integers(n)`` (1 <= n < 2^32) of a PCG64 generator,
    computed in Python from its raw 64-bit outputs, fetched 4,096 at a time.

    numpy's scalar calls cost about 1 us each, which a loop of one draw per subchannel (218,000 calls
    at K = 1,000, M = N = 2,730) feels.  numpy's own rules, reproduced: ``random()`` is the top 53
    bits of one output times 2^-53; ``integers(n)`` is 0 without a draw for n = 1, else Lemire's
    bounded draw on 32-bit halves (low half first, the high half kept for the next 32-bit draw, see
    :func:`_pcg_after`), redrawn while the product's low word is below (2^32 - n) mod n.
    :meth:`finish` leaves the generator where the same calls on it would have.  Tests compare all
    three with numpy's.
    """

    def __init__(self, rng: np.random.Generator):
        self.bitgen = rng.bit_generator
        start = self.bitgen.state
        self.has_spare, self.spare = start["has_uint32"], start["uinteger"]  # as numpy keeps them
        self.source = type(self.bitgen)()
        self.source.state = start
        self.words: list[int] = []
        self.next = self.used = 0

    def _word(self) -> int:
        if self.next == len(self.words):
            self.used += len(self.words)
            self.words, self.next = self.source.random_raw(4096).tolist(), 0
        word = self.words[self.next]
        self.next += 1
        return word

    def random(self) -> float:
        return (self._word() >> 11) * (1.0 / 9007199254740992.0)

    def integers(self, n: int) -> int:
        if n == 1:
            return 0
        while True:
            if self.has_spare:
                half, self.has_spare = self.spare, 0
            else:
                word = self._word()
                self.has_spare, self.spare, half = 1, word >> 32, word & 0xFFFFFFFF
            scaled = half * n
            if scaled & 0xFFFFFFFF >= n or scaled & 0xFFFFFFFF >= (0xFFFFFFFF - (n - 1)) % n:
                return scaled >> 32

    def finish(self) -> None:
        """Move the generator past the draws taken, with its spare 32-bit half as they left it."""
        self.bitgen.advance(self.used + self.next)  # (advance clears the spare half: set it after)
        self.bitgen.state = {**self.bitgen.state, "has_uint32": self.has_spare, "uinteger": self.spare}


def _uniform_covering(rng: np.random.Generator, K: int, M: int) -> np.ndarray:
    """Exact uniform draw of an owner array covering all K clients, subchannel by subchannel: with r
    subchannels left and u clients uncovered, an uncovered client gets the next one with probability
    u N(r-1, u-1) / N(r, u) = (u/K) q(r-1, u-1) / q(r, u) (see :func:`_log_covering`), uniformly among
    the uncovered (else among the covered) clients in increasing index order: ``rng.random()``, then
    ``rng.integers(u)`` or ``rng.integers(number covered)``.  Plain lists: this loop runs once per
    subchannel; PCG64 generators are read through :class:`_ScalarDraws` (the same numbers)."""
    p_new = _new_client_chance(K, M)
    fast = type(rng.bit_generator) in (np.random.PCG64, np.random.PCG64DXSM)
    draws = _ScalarDraws(rng) if fast else rng
    uniform, integers = draws.random, draws.integers
    uncovered = list(range(K))  # both ascending, as np.flatnonzero would list them
    covered: list[int] = []
    owner = [0] * M
    for i in range(M):
        u = len(uncovered)
        if uniform() < p_new.item(M - i, u):
            client = uncovered.pop(integers(u))
            insort(covered, client)
        else:
            client = covered[integers(len(covered))]
        owner[i] = client
    if fast:
        draws.finish()
    return np.array(owner, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# "proposed": spec §5 steps 1-3 and a local search


def _alternate(link: Link, c: np.ndarray, data_bits: float) -> LinkAllocation:
    """Spec §5 steps 1-3: greedy, exact power control, re-run greedy with the solution's powers."""
    best = _power_control(link, greedy_assignment(link, c, data_bits), c, data_bits)
    for _ in range(MAX_ALTERNATION_PASSES):
        used = np.bincount(best.owner, weights=best.power_w, minlength=link.num_clients)
        owner = greedy_assignment(link, c, data_bits, budget_w=used)
        if np.array_equal(owner, best.owner):
            break
        candidate = _power_control(link, owner, c, data_bits)
        if candidate.value_s >= best.value_s * (1 - _REL_IMPROVEMENT):
            break
        best = candidate
    return best


def _insert_sorted(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Append one value to each descending-sorted row (zero padded) and keep the rows sorted."""
    return -np.sort(-np.concatenate([rows, values[..., None]], axis=-1), axis=-1)


def _subchannel_value(snr: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """First-order power a subchannel of snr a saves a client whose water level is mu.

    Without it the client loses log2(mu a) bit/s/Hz, which costs mu ln 2 per bit/s/Hz elsewhere,
    and frees its own mu - 1/a: the net is (x ln x - x + 1) / a with x = mu a (0 when inactive).
    Used only to rank moves and swaps on large instances; their merit is then computed exactly.
    """
    x = mu * snr
    np.maximum(x, 1.0, out=x)
    value = np.log(x)  # then (x ln x - x + 1) / a, in place: K x M temporaries are the cost at scale
    value *= x
    value -= x
    value += 1.0
    value /= snr
    return value


def _top(score: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest scores (all indices when there are not more than that)."""
    if score.size <= count:
        return np.arange(score.size)
    return np.argpartition(-score, count)[:count]


#: most (pair) candidates the screening of swaps expands at once (see :func:`_screen_swaps`)
SCREEN_CAPACITY = 2**22
#: up to this many swaps (K = 200 and M = 546 have 150,000) scoring them all is the quicker way
SCREEN_SCAN_MAX = 2**18
_BLOCK = 2**20  # entries of a (rows, M) block of swap scores computed at once by the fallback scan


def _best(scores: np.ndarray, positions: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest ``scores``, the lower position first on ties."""
    if scores.size <= count:
        return np.arange(scores.size)
    cut = np.partition(scores, scores.size - count)[scores.size - count]
    near = np.flatnonzero(scores >= cut)  # the count largest and any ties with the last
    return near[np.lexsort((positions[near], -scores[near]))[:count]]


def _top_positions(scores: np.ndarray, positions: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` largest ``scores`` (the lower position first on ties), ascending."""
    return np.sort(positions[_best(scores, positions, count)])


def _screen_moves(gain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, j) of the LOCAL_SEARCH_SCREENED moves (client r takes subchannel j) with the largest
    ``gain[j, r]`` (-inf: j's owner), ties to the lower (r, j); listed in (r, j) order.

    Only moves reaching the LOCAL_SEARCH_SCREENED-th largest of the subchannels' best moves (a lower
    bound on the overall one) are ranked.
    """
    m, k = gain.shape
    per_row = -(-LOCAL_SEARCH_SCREENED // m)
    if per_row == 1:
        best = gain.max(axis=1)
    else:
        best = np.partition(gain, k - per_row, axis=1)[:, k - per_row :].ravel() if per_row < k else gain.ravel()
    bound = -np.inf
    if best.size >= LOCAL_SEARCH_SCREENED:
        bound = -np.partition(-best, LOCAL_SEARCH_SCREENED - 1)[LOCAL_SEARCH_SCREENED - 1]
    flat = np.flatnonzero((gain >= bound) & (gain > -np.inf))
    key = _top_positions(gain.ravel()[flat], flat % k * m + flat // k, LOCAL_SEARCH_SCREENED)
    return key // m, key % m


def _swap_gain(value: np.ndarray, held: np.ndarray, owner: np.ndarray, j1: np.ndarray, j2: np.ndarray) -> np.ndarray:
    """First-order power saved by swapping subchannels j1 and j2 (``value[j, r]``: see
    :func:`_subchannel_value`; ``held[j] = value[j, owner[j]]``)."""
    return value[j2, owner[j1]] + value[j1, owner[j2]] - held[j1] - held[j2]


def _screen_swaps(value: np.ndarray, held: np.ndarray, gain: np.ndarray,
                  owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(j1, j2) of the LOCAL_SEARCH_SCREENED swaps (j1 < j2 of different owners) with the largest
    :func:`_swap_gain`, ties to the lower (j1, j2); listed in (j1, j2) order.

    Swapping x (owned by a) with y (owned by b) gains G[a, y] + G[b, x] (up to rounding), G[r, j] =
    ``gain[j, r]`` = value - held the gain of moving j to r.  So the best swap between clients a and b
    gains P[a, b] + P[b, a], P[a, b] the largest G[a, y] over b's subchannels y (a K x K table).  A
    lower bound tau on the LOCAL_SEARCH_SCREENED-th largest gain comes from the sums of the 16 best
    moves each way between the client pairs with the largest best swaps; only client pairs whose best
    swap reaches tau, and within them only swaps whose two moves sum to tau, are scored exactly (less
    a rounding margin).  That is O(K M + K^2) instead of scoring all M^2 / 2 swaps; when there are
    at most SCREEN_SCAN_MAX swaps, or more than SCREEN_CAPACITY would pass (many equal gains), every
    swap is scored, in blocks (:func:`_scan_swaps`).
    """
    m, k = gain.shape
    mine = np.argsort(owner, kind="stable")  # each client's subchannels, contiguous
    counts = np.bincount(owner, minlength=k)
    if m * (m - 1) // 2 - int((counts * (counts - 1) // 2).sum()) <= SCREEN_SCAN_MAX:
        return _scan_swaps(value, held, owner)
    starts = np.cumsum(counts) - counts
    toward = np.full((k, k), -np.inf)  # toward[b, a] = P[a, b]
    place = np.arange(m) - np.repeat(starts, counts)
    for n in range(int(counts.max())):
        rows = mine[place == n]
        toward[owner[rows]] = np.maximum(toward[owner[rows]], gain[rows])
    a_all, b_all = np.triu_indices(k, k=1)
    best_swap = toward[a_all, b_all] + toward[b_all, a_all]
    margin = 8 * np.finfo(float).eps * (value.max() + held.max())  # both >= 0

    def sides(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """b's subchannels y with G[a, y], and a's subchannels x with G[b, x], each by decreasing G."""
        ys, xs = mine[starts[b] : starts[b] + counts[b]], mine[starts[a] : starts[a] + counts[a]]
        gy, gx = gain[ys, a], gain[xs, b]
        oy, ox = np.argsort(-gy, kind="stable"), np.argsort(-gx, kind="stable")
        return ys[oy], gy[oy], xs[ox], gx[ox]

    sample = [np.empty(0)]
    for a, b in zip(a_all[_top(best_swap, LOCAL_SEARCH_SCREENED)].tolist(),
                    b_all[_top(best_swap, LOCAL_SEARCH_SCREENED)].tolist()):
        _, gy, _, gx = sides(a, b)
        sample.append((gy[:16, None] + gx[None, :16]).ravel())
    sample = np.concatenate(sample)
    tau = -np.inf
    if sample.size >= LOCAL_SEARCH_SCREENED:
        tau = -np.partition(-sample, LOCAL_SEARCH_SCREENED - 1)[LOCAL_SEARCH_SCREENED - 1] - margin
    pairs = np.flatnonzero(best_swap >= tau)
    if pairs.size <= SCREEN_CAPACITY // 64:
        found, total = [np.empty(0, dtype=np.intp)], 0
        for a, b in zip(a_all[pairs].tolist(), b_all[pairs].tolist()):
            ys, gy, xs, gx = sides(a, b)
            reach = np.searchsorted(-gx, gy - tau, side="right")  # the x with G[b, x] >= tau - G[a, y]
            total += int(reach.sum())
            if total > SCREEN_CAPACITY:
                break
            y = np.repeat(ys, reach)
            x = xs[np.arange(reach.sum()) - np.repeat(np.cumsum(reach) - reach, reach)]
            found.append(np.minimum(x, y) * m + np.maximum(x, y))
        else:
            key = np.concatenate(found)
            key = _top_positions(_swap_gain(value, held, owner, key // m, key % m), key, LOCAL_SEARCH_SCREENED)
            return key // m, key % m
    return _scan_swaps(value, held, owner)


def _scan_swaps(value: np.ndarray, held: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_screen_swaps` by scoring every swap, _BLOCK at a time (for few swaps, or many ties)."""
    m = owner.size
    cols = np.arange(m)
    kept_gain, kept_key = np.empty(0), np.empty(0, dtype=np.intp)
    step = max(1, _BLOCK // m)
    for lo in range(0, m, step):
        rows = cols[lo : lo + step]
        r, c = np.nonzero((cols[None, :] > rows[:, None]) & (owner[None, :] != owner[rows][:, None]))
        key = np.concatenate([kept_key, rows[r] * m + c])
        gain_rc = np.concatenate([kept_gain, _swap_gain(value, held, owner, rows[r], c)])
        top = _best(gain_rc, key, LOCAL_SEARCH_SCREENED)
        kept_gain, kept_key = gain_rc[top], key[top]
    key = np.sort(kept_key)
    return key // m, key % m


def _neighbourhood(
    link: Link, owner: np.ndarray, c: np.ndarray, data_bits: float, t: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-t view of single moves and swaps of subchannels.

    At the current value t every client k needs D/(t - c[k]) bit/s; an assignment reaches t iff its
    minimum powers P_k satisfy phi = max(sum_k P_k / Pth, max_k P_k / Pmax[k]) <= 1, and phi < 1
    means a strictly lower value.  A move (subchannel j to client r) or a swap (j1 <-> j2) changes
    two clients' powers, so only those need a new inverse water-filling.

    Every move and swap is scored when there are at most LOCAL_SEARCH_FULL of them; otherwise the
    LOCAL_SEARCH_SCREENED best of each by :func:`_subchannel_value` (:func:`_screen_moves`,
    :func:`_screen_swaps`: O(K M) time and memory, not O(M^2)).  Where the cut falls among equal
    scores, the lowest (client, subchannel) or (j1, j2) are kept, and the neighbours are listed in
    that order.  (An argpartition of all scores kept an arbitrary subset in an arbitrary order: the
    same neighbours and the same results wherever scores are distinct, e.g. at K = 50 to 1,000 with
    Rayleigh fading; a different descent, about 1e-6 relative apart, where many tie.)  Returns, per neighbour, the two
    (subchannel, new owner) changes -- a move's second change is a no-op on its own subchannel --
    the two touched clients' new powers minus their old ones, and phi.
    """
    k, m = link.gains.shape
    snr = link.snr
    cols = np.arange(m)
    rho = _bits_per_hz(link, c, data_bits, t)
    rows = _owned_rows(snr, owner)
    width = rows.snr.shape[1]
    base, mu = rows.min_power(rho)
    counts = np.bincount(owner, minlength=k)

    if _neighbourhood_count(counts) > LOCAL_SEARCH_FULL:
        value = _subchannel_value(link.snr_by_subchannel, mu[None, :])  # (M, K): value[j, r]
        held = value[cols, owner]
        gain = value - held[:, None]  # gain[j, r]: moving j to r (-inf: to its owner)
        gain[cols, owner] = -np.inf
        mv_r, mv_j = _screen_moves(gain)
        sw_1, sw_2 = _screen_swaps(value, held, gain, owner)
    else:  # K = 1 has no neighbour; otherwise M (K - 1) <= LOCAL_SEARCH_FULL, so M is small
        mv_r, mv_j = np.nonzero(owner[None, :] != np.arange(k)[:, None])
        sw_1, sw_2 = np.triu_indices(m if k > 1 else 0, k=1)
        keep = owner[sw_1] != owner[sw_2]
        sw_1, sw_2 = sw_1[keep], sw_2[keep]

    # a subchannel's owner without it: the owner's sorted row less that subchannel's column (only for
    # the subchannels the neighbours move: M x width values at once could be gigabytes)
    padded = np.concatenate([rows.snr, np.zeros((k, 1))], axis=1)
    place = np.arange(width)[None, :]

    def without(j: np.ndarray) -> np.ndarray:
        return padded[owner[j][:, None], place + (place >= rows.place[j][:, None])]

    # the owner's power without the subchannel it gives away (inf when it would be left with none)
    loss, _ = _Rows(without(mv_j)).min_power(rho[owner[mv_j]])
    loss = np.where(counts[owner[mv_j]] > 1, loss, np.inf)
    # new powers: the receiver of a move, and both sides of a swap
    received, _ = _Rows(
        _insert_sorted(
            np.concatenate([rows.snr[mv_r], without(sw_1), without(sw_2)]),
            np.concatenate([snr[mv_r, mv_j], snr[owner[sw_1], sw_2], snr[owner[sw_2], sw_1]]),
        )
    ).min_power(np.concatenate([rho[mv_r], rho[owner[sw_1]], rho[owner[sw_2]]]))
    n_mv, n_sw = mv_r.size, sw_1.size

    first = np.concatenate([mv_j, sw_1])
    second = np.concatenate([mv_j, sw_2])
    a = np.concatenate([mv_r, owner[sw_1]])
    b = np.concatenate([owner[mv_j], owner[sw_2]])
    pa = np.concatenate([received[:n_mv], received[n_mv : n_mv + n_sw]])
    pb = np.concatenate([loss, received[n_mv + n_sw :]])
    changes = np.stack(
        [first, np.concatenate([mv_r, owner[sw_2]]), second, np.concatenate([mv_r, owner[sw_1]])], axis=1
    )
    delta = np.stack([pa - base[a], pb - base[b]], axis=1)

    ratio = base / link.p_max_w
    untouched = np.full(a.size, -np.inf)  # largest ratio among the clients a neighbour leaves alone
    for idx in np.argsort(-ratio)[:3][::-1]:
        untouched = np.where((a != idx) & (b != idx), ratio[idx], untouched)
    total = base.sum() + delta.sum(axis=1)
    phi = np.maximum.reduce([total / link.p_th_w, pa / link.p_max_w[a], pb / link.p_max_w[b], untouched])
    return changes, np.stack([a, b], axis=1), delta, phi, base


def _disjoint_batch(
    link: Link, clients: np.ndarray, delta: np.ndarray, phi: np.ndarray, base: np.ndarray
) -> np.ndarray:
    """Neighbours touching pairwise different clients that, applied together, help at the current t.

    Taken greedily, those with phi < 1 first (best first), then the rest by how much they lower
    their two clients' larger power-to-Pmax ratio.  A neighbour joins when its clients stay below
    Pmax and it either lowers the total power or lowers its pair's larger ratio while the running
    total stays within Pth.  Neighbours touching different clients change powers independently, so
    the batch's effect is the sum of theirs; it lowers several near-binding clients in one pass.
    """
    ratio = base / link.p_max_w
    after = np.maximum(base[clients[:, 0]] + delta[:, 0], 0) / link.p_max_w[clients[:, 0]]
    after = np.maximum(after, (base[clients[:, 1]] + delta[:, 1]) / link.p_max_w[clients[:, 1]])
    before = ratio[clients].max(axis=1)
    change = delta.sum(axis=1)
    ok = (after < 1 - _REL_IMPROVEMENT) & ((change < 0) | (after < before * (1 - _REL_IMPROVEMENT)))
    candidates = np.flatnonzero(ok)
    order = np.lexsort((after[candidates] - before[candidates], np.minimum(phi[candidates], 1.0)))
    chosen = []
    used = np.zeros(link.num_clients, dtype=bool)
    total = base.sum()
    limit = link.p_th_w * (1 - _REL_IMPROVEMENT)
    for n in candidates[order]:
        a, b = clients[n]
        if used[a] or used[b] or (change[n] >= 0 and total + change[n] > limit):
            continue
        chosen.append(n)
        used[[a, b]] = True
        total += change[n]
    return np.array(chosen, dtype=np.intp)


def _apply(owner: np.ndarray, changes: np.ndarray) -> np.ndarray:
    new = owner.copy()
    for j1, r1, j2, r2 in changes:
        new[j1], new[j2] = r1, r2
    return new


def _local_search(
    link: Link, c: np.ndarray, data_bits: float, start: LinkAllocation, max_passes: int
) -> LinkAllocation:
    """Move one subchannel to another client, or swap two, while the exact value drops.

    Each pass scores neighbours by phi at the current value (:func:`_neighbourhood`) and re-solves
    with exact power control (a) every improving neighbour touching different clients, applied
    together, and (b) on instances scored in full, the LOCAL_SEARCH_EXACT_PER_PASS best single
    neighbours; it keeps the best if it lowers the value.  At most ``max_passes`` passes.
    """
    best = start
    for _ in range(max_passes):
        changes, clients, delta, phi, base = _neighbourhood(link, best.owner, c, data_bits, best.value_s)
        hopeful = np.flatnonzero(phi < 1 - _REL_IMPROVEMENT)
        if hopeful.size == 0:
            break
        trials = []
        batch = _disjoint_batch(link, clients, delta, phi, base)
        if batch.size > 1:
            trials.append(changes[batch])
        if len(phi) <= LOCAL_SEARCH_FULL or not trials:
            singles = hopeful[np.argsort(phi[hopeful], kind="stable")[:LOCAL_SEARCH_EXACT_PER_PASS]]
            trials.extend(changes[[n]] for n in singles)
        improved = best
        for trial in trials:
            candidate = _power_control(link, _apply(best.owner, trial), c, data_bits)
            if candidate.value_s < improved.value_s:
                improved = candidate
        if improved.value_s >= best.value_s * (1 - _REL_IMPROVEMENT):
            break
        best = improved
    return best


def _neighbourhood_size(k: int, m: int) -> int:
    """Upper bound on moves + swaps: K*M moves, M(M-1)/2 swaps."""
    return k * m + m * (m - 1) // 2


def _neighbourhood_count(counts: np.ndarray) -> int:
    """Moves (M (K - 1)) plus swaps (pairs of subchannels of different owners) of an assignment whose
    clients own ``counts`` subchannels each."""
    k, m = counts.size, int(counts.sum())
    return m * (k - 1) + m * (m - 1) // 2 - int((counts * (counts - 1) // 2).sum())


def solve_link(link: Link, c, D) -> LinkAllocation:
    """The "proposed" per-link solver: spec §5 steps 1-3, then a local search of moves and swaps.

    Size-adaptive (K clients, M subchannels, n = K*M + M(M-1)/2 neighbours):
    * n <= LOCAL_SEARCH_RESTART_MAX (e.g. K <= 4, M <= 8): the local search also runs from
      LOCAL_SEARCH_RESTARTS random assignments (numpy.random.default_rng(0): deterministic), since a
      single descent can stop in a local optimum several moves from the global one;
    * n <= LOCAL_SEARCH_FULL: every move and swap is scored each pass, at most LOCAL_SEARCH_MAX_PASSES;
    * larger: LOCAL_SEARCH_SCREENED moves and swaps per pass, at most LOCAL_SEARCH_MAX_PASSES_SCREENED
      passes (each pass is O(K*M + M^2) plus one exact power control; K=50, M=128 ~ 5 ms).
    """
    c, data_bits = _check_demand(link, c, D)
    k, m = link.gains.shape
    n = _neighbourhood_size(k, m)
    passes = LOCAL_SEARCH_MAX_PASSES if n <= LOCAL_SEARCH_FULL else LOCAL_SEARCH_MAX_PASSES_SCREENED
    best = _local_search(link, c, data_bits, _alternate(link, c, data_bits), passes)
    if n <= LOCAL_SEARCH_RESTART_MAX:
        rng = np.random.default_rng(0)
        for _ in range(LOCAL_SEARCH_RESTARTS):
            start = _power_control(link, random_assignment(rng, k, m).astype(np.intp), c, data_bits)
            candidate = _local_search(link, c, data_bits, start, passes)
            if candidate.value_s < best.value_s:
                best = candidate
    return best


# ----------------------------------------------------------------------------------------------
# exact solver for small instances


@functools.cache
def _subset_pairs(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (S, T) with T a nonempty subset of S over m items, sorted by S; and each S's first row."""
    codes = np.arange(3**m, dtype=np.int64)
    s = np.zeros_like(codes)
    t = np.zeros_like(codes)
    for bit in range(m):
        digit = codes % 3
        codes //= 3
        s |= (digit > 0).astype(np.int64) << bit
        t |= (digit == 2).astype(np.int64) << bit
    keep = t != 0
    s, t = s[keep], t[keep]
    order = np.argsort(s, kind="stable")
    s, t = s[order], t[order]
    starts = np.searchsorted(s, np.arange(1, 2**m))
    return s, t, starts


def _subset_rows(snr: np.ndarray) -> _Rows:
    """(K, 2^M, M) rows: client k's snr on the subchannels of subset S, sorted descending."""
    m = snr.shape[1]
    members = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1
    owned = np.where(members[None, :, :] == 1, snr[:, None, :], 0.0)
    return _Rows(-np.sort(-owned, axis=-1))


def _min_power_partition(
    link: Link, subsets: _Rows, c: np.ndarray, data_bits: float, t: float
) -> np.ndarray | None:
    """An assignment reaching value t (minimum total power, per-client caps), or None if none can.

    DP over subsets: best[k][S] = min over nonempty T in S of best[k-1][S \\ T] + P_k(T), where
    P_k(T) is client k's inverse water-filling power on T for rate D/(t - c[k]) (inf above Pmax[k]).
    """
    k, m = link.gains.shape
    full = 2**m - 1
    rho = _bits_per_hz(link, c, data_bits, t)
    cost, _ = subsets.min_power(rho[:, None])  # (K, 2^M)
    cost = np.where(cost <= np.minimum(link.p_max_w, link.p_th_w)[:, None], cost, np.inf)
    cost[:, 0] = np.inf
    s, sub, starts = _subset_pairs(m)
    best = [np.r_[0.0, np.full(full, np.inf)]]
    for client in range(k):
        layer = np.full(full + 1, np.inf)
        layer[1:] = np.minimum.reduceat(best[-1][s ^ sub] + cost[client, sub], starts)
        best.append(layer)
    if not best[-1][full] <= link.p_th_w:
        return None
    owner = np.empty(m, dtype=np.intp)
    rest = full
    for client in range(k - 1, -1, -1):
        subs = np.arange(1, rest + 1)
        subs = subs[(subs & rest) == subs]
        j = int(np.argmin(best[client][rest ^ subs] + cost[client, subs]))
        part = int(subs[j])
        owner[[i for i in range(m) if part >> i & 1]] = client
        rest ^= part
    return owner


def solve_link_exact(link: Link, c, D, rel_tol: float = 1e-10) -> LinkAllocation:
    """Global optimum of the per-link problem (to ``rel_tol`` relative) for small instances.

    Instead of enumerating all K^M assignments, it lowers t: start from the greedy's value; at
    t(1 - rel_tol) a subset DP (O(K * 3^M)) finds an assignment whose minimum powers fit every budget,
    if one exists; its exact power control gives a strictly lower t.  When none exists, no assignment
    beats the current one by more than rel_tol.  Zero-power subchannels are allowed (every subchannel
    still has an owner).  Raises InstanceTooLarge when K * 3^M > EXACT_MAX_WORK.
    """
    c, data_bits = _check_demand(link, c, D)
    k, m = link.gains.shape
    if not exact_size_ok(k, m):
        work = exact_work(k, m)
        raise InstanceTooLarge(
            f"solve_link_exact: K={k} clients and M={m} subchannels need K*3^M = {work:.3g} DP steps per "
            f"test, above the limit {EXACT_MAX_WORK:.3g} (e.g. M <= 12 for K <= 4); use solve_link"
        )
    subsets = _subset_rows(link.snr)
    best = _power_control(link, greedy_assignment(link, c, data_bits), c, data_bits)
    while True:
        owner = _min_power_partition(link, subsets, c, data_bits, best.value_s * (1 - rel_tol))
        if owner is None:
            return best
        candidate = _power_control(link, owner, c, data_bits)
        if candidate.value_s >= best.value_s:  # rounding at the tolerance's edge: nothing better
            return best
        best = candidate
