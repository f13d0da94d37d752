"""Per-link solver (sflllm.allocation.link, spec §5): validation, water-filling, power control against
a generic convex solver, greedy semantics, exact solver against brute force, feasibility properties."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sflllm.allocation import link as L
from sflllm.allocation.link import (
    InstanceTooLarge,
    Link,
    equal_power,
    greedy_assignment,
    power_control,
    random_assignment,
    rates,
    solve_link,
    solve_link_exact,
)

N0 = 10 ** ((-174 - 30) / 10)
W = 1e6


def make_link(rng, K, M, *, p_th_factor=1.0, p_max=None):
    """Gains from path loss at 50-300 m with Rayleigh fading; Pth = p_th_factor * sum(Pmax)."""
    distance = rng.uniform(50, 300, K)
    gains = 10 ** (-(128.1 + 37.6 * np.log10(distance / 1000)) / 10)[:, None] * rng.exponential(1.0, (K, M))
    p_max = rng.uniform(0.1, 0.3, K) if p_max is None else np.asarray(p_max, dtype=float)
    return Link(gains, W, N0, p_max, p_th_factor * p_max.sum())


def assert_feasible(link, alloc, c, D):
    K, M = link.gains.shape
    assert alloc.owner.shape == (M,) and alloc.power_w.shape == (M,)
    assert set(np.unique(alloc.owner)) == set(range(K)), "every client owns a subchannel"
    assert np.all(alloc.power_w >= 0)
    per_client = np.bincount(alloc.owner, weights=alloc.power_w, minlength=K)
    assert np.all(per_client <= link.p_max_w), "per-client power within Pmax"
    assert alloc.power_w.sum() <= link.p_th_w, "link power within Pth"
    rate = rates(link, alloc.owner, alloc.power_w)
    np.testing.assert_allclose(alloc.rate_bps, rate, rtol=1e-12)
    np.testing.assert_allclose(alloc.latency_s, c + D / rate, rtol=1e-12)
    assert alloc.value_s == pytest.approx(float(np.max(c + D / rate)), rel=1e-12)


# ------------------------------------------------------------------ validation


def test_link_rejects_more_clients_than_subchannels():
    with pytest.raises(ValueError, match=r"K = 3 clients but only M = 2 subchannels"):
        Link(np.ones((3, 2)), W, N0, np.ones(3), 1.0)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("bandwidth_hz", dict(bandwidth_hz=0.0)),
        ("noise_w_per_hz", dict(noise_w_per_hz=-1.0)),
        ("p_th_w", dict(p_th_w=0.0)),
        ("p_max_w", dict(p_max_w=np.array([0.1, 0.0]))),
        ("p_max_w", dict(p_max_w=np.array([0.1, 0.1, 0.1]))),
        ("gains", dict(gains=np.array([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]))),
        ("gains", dict(gains=np.ones(3))),
    ],
)
def test_link_errors_name_the_field(field, kwargs):
    base = dict(gains=np.ones((2, 3)), bandwidth_hz=W, noise_w_per_hz=N0, p_max_w=np.ones(2), p_th_w=1.0)
    with pytest.raises(ValueError, match=field):
        Link(**{**base, **kwargs})


def test_bad_assignment_and_demand_are_rejected():
    link = make_link(np.random.default_rng(0), 2, 3)
    with pytest.raises(ValueError, match=r"without a subchannel"):
        power_control(link, np.array([0, 0, 0]), np.zeros(2), 1e6)
    with pytest.raises(ValueError, match=r"owner must have shape \(3,\)"):
        power_control(link, np.array([0, 1]), np.zeros(2), 1e6)
    with pytest.raises(ValueError, match=r"outside 0..1"):
        power_control(link, np.array([0, 1, 2]), np.zeros(2), 1e6)
    with pytest.raises(ValueError, match=r"c must have shape \(2,\)"):
        solve_link(link, np.zeros(3), 1e6)
    with pytest.raises(ValueError, match=r"D \(bits to send\)"):
        solve_link(link, np.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"K = 4 clients cannot each own one of M = 3"):
        random_assignment(np.random.default_rng(0), 4, 3)


def test_rates_follow_spec_formula():
    rng = np.random.default_rng(1)
    link = make_link(rng, 3, 6)
    owner = np.array([0, 1, 2, 2, 0, 1])
    power = rng.uniform(0, 0.05, 6)
    expected = np.zeros(3)
    for i in range(6):
        expected[owner[i]] += W * math.log2(1 + power[i] * link.gains[owner[i], i] / (N0 * W))
    np.testing.assert_allclose(rates(link, owner, power), expected, rtol=1e-13)


def test_optimiser_side_imports_no_torch():
    code = "import sys, sflllm.allocation.link; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ water-filling

snr_rows = st.lists(st.floats(1e-2, 1e7), min_size=1, max_size=8).map(lambda v: np.sort(np.array(v))[::-1].copy())


@given(snr=snr_rows, power=st.floats(1e-6, 10.0))
def test_inverse_water_filling_inverts_forward(snr, power):
    rows = L._Rows(snr[None, :])
    bits = rows.max_rate(np.array([power]))
    back, mu = rows.min_power(bits)
    assert back[0] == pytest.approx(power, rel=1e-9)
    # the water-filled powers reach exactly that rate
    p = np.maximum(mu[0] - 1 / snr, 0)
    assert p.sum() == pytest.approx(power, rel=1e-9)
    assert np.sum(np.log2(1 + p * snr)) == pytest.approx(bits[0], rel=1e-9)


@given(snr=snr_rows, power=st.floats(0.0, 10.0))
def test_incremental_water_filling_matches_vectorised(snr, power):
    """The greedy's O(1)-per-subchannel water-filling equals the vectorised one after every append."""
    rate = L._ClientRate(power)
    for n, value in enumerate(snr.tolist(), start=1):
        rate.add(value)
        full = L._Rows(snr[None, :n]).max_rate(np.array([power]))[0]
        assert rate.bits == pytest.approx(full, rel=1e-12, abs=1e-12)


@given(snr=snr_rows, power=st.floats(1e-6, 10.0), seed=st.integers(0, 2**32 - 1))
def test_water_filling_beats_any_other_split(snr, power, seed):
    split = np.random.default_rng(seed).dirichlet(np.ones(snr.size)) * power
    best = L._Rows(snr[None, :]).max_rate(np.array([power]))[0]
    assert np.sum(np.log2(1 + split * snr)) <= best * (1 + 1e-12) + 1e-12


@given(snr=snr_rows, power=st.floats(1e-6, 10.0), seed=st.integers(0, 2**32 - 1))
def test_public_water_filling_rate_takes_any_order_and_ignores_unusable(snr, power, seed):
    shuffled = np.random.default_rng(seed).permutation(np.concatenate([snr, np.zeros(2)]))
    expected = L._Rows(snr[None, :]).max_rate(np.array([power]))[0]
    assert L.water_filling_rate(shuffled, power) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    both = L.water_filling_rate(np.stack([shuffled, shuffled[::-1]]), np.array([power, power]))
    np.testing.assert_allclose(both, [expected, expected], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ power control vs a generic convex solver


def cvx_value(link, owner, c, D):
    """min t s.t. c + D/R <= t and the power budgets, by cvxpy with Clarabel (rates in bit/s/Hz)."""
    cp = pytest.importorskip("cvxpy")
    K, M = link.gains.shape
    p = cp.Variable(M, nonneg=True)
    t = cp.Variable()
    a = link.gains[owner, np.arange(M)] / (N0 * W)
    cons = [cp.sum(p) <= link.p_th_w]
    for k in range(K):
        idx = np.flatnonzero(owner == k)
        spectral = cp.sum(cp.log(1 + cp.multiply(a[idx], p[idx]))) / np.log(2)
        cons += [cp.sum(p[idx]) <= link.p_max_w[k], (D / W) * cp.inv_pos(t - c[k]) <= spectral]
    problem = cp.Problem(cp.Minimize(t), cons)
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == "optimal"
    return float(t.value)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("binding", ["p_th", "p_max"])
def test_power_control_matches_convex_solver(seed, binding):
    rng = np.random.default_rng(100 + seed)
    K, M = int(rng.integers(2, 5)), 8
    # Pth at a fifth of the clients' total binds; Pth above the total cannot bind, so some Pmax does
    link = make_link(rng, K, M, p_th_factor=0.2 if binding == "p_th" else 1.5)
    c, D = rng.uniform(0, 1, K), 2e7
    owner = random_assignment(rng, K, M)
    alloc = power_control(link, owner, c, D)
    assert_feasible(link, alloc, c, D)
    assert alloc.value_s == pytest.approx(cvx_value(link, owner, c, D), rel=1e-5)
    per_client = np.bincount(owner, weights=alloc.power_w, minlength=K)
    if binding == "p_th":
        assert alloc.power_w.sum() == pytest.approx(link.p_th_w, rel=1e-9)
        assert np.all(per_client < link.p_max_w * (1 - 1e-6))
    else:
        assert alloc.power_w.sum() < link.p_th_w * (1 - 1e-6)
        assert np.max(per_client / link.p_max_w) == pytest.approx(1.0, rel=1e-9)
    # at the optimum nobody is faster than needed: every latency equals the value
    np.testing.assert_allclose(alloc.latency_s, alloc.value_s, rtol=1e-9)


def test_power_control_is_optimal_against_perturbations():
    """No feasible re-split of the optimal powers (shifted between subchannels) lowers the value."""
    rng = np.random.default_rng(7)
    link = make_link(rng, 3, 7, p_th_factor=0.3)
    c, D = rng.uniform(0, 1, 3), 2e7
    owner = random_assignment(rng, 3, 7)
    alloc = power_control(link, owner, c, D)
    for _ in range(200):
        shaken = alloc.power_w * rng.uniform(0.8, 1.2, 7)
        shaken = L._fit_budgets(link, owner, shaken)
        rate = rates(link, owner, shaken)
        assert np.max(c + D / rate) >= alloc.value_s * (1 - 1e-12)


# ------------------------------------------------------------------ greedy (spec §5 step 1)


def test_greedy_follows_spec_step_1():
    # client 0 has the largest c, so it picks first and stays the straggler; client 1 is fast
    gains = np.array([[4.0, 1.0, 3.0, 2.0], [1.0, 5.0, 6.0, 2.0]]) * 1e-12
    link = Link(gains, W, N0, np.array([0.1, 0.1]), 0.2)
    owner = greedy_assignment(link, np.array([5.0, 0.0]), 1e5)
    # init: client 0 takes subchannel 0 (its best), client 1 takes 2 (its best remaining);
    # then client 0 (straggler) takes its best remaining (3, gain 2 > 1), then subchannel 1.
    np.testing.assert_array_equal(owner, [0, 0, 1, 0])


def test_greedy_straggler_order_follows_the_budgets():
    gains = np.array([[4.0, 1.0, 3.0, 2.0], [1.0, 5.0, 6.0, 2.0]]) * 1e-12
    link = Link(gains, W, N0, np.array([0.1, 0.1]), 0.2)
    # with a tiny budget client 1 is the straggler and takes what it rates best among the rest
    owner = greedy_assignment(link, np.array([0.0, 0.0]), 1e6, budget_w=np.array([0.1, 1e-9]))
    np.testing.assert_array_equal(owner, [0, 1, 1, 1])
    with pytest.raises(ValueError, match="budget_w"):
        greedy_assignment(link, np.zeros(2), 1e6, budget_w=np.ones(3))


# ------------------------------------------------------------------ exact solver


def brute_force(link, c, D):
    K, M = link.gains.shape
    best = math.inf
    for owner in itertools.product(range(K), repeat=M):
        owner = np.array(owner)
        if len(set(owner.tolist())) == K:
            best = min(best, power_control(link, owner, c, D).value_s)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 4))
    M = int(rng.integers(K, 6))
    link = make_link(rng, K, M, p_th_factor=0.25 if seed % 2 else 2.0)
    c, D = rng.uniform(0, 1, K), 2e7
    exact = solve_link_exact(link, c, D)
    assert_feasible(link, exact, c, D)
    assert exact.value_s == pytest.approx(brute_force(link, c, D), rel=1e-9)
    assert solve_link(link, c, D).value_s >= exact.value_s * (1 - 1e-9)


def test_exact_refuses_large_instances():
    link = make_link(np.random.default_rng(0), 4, 16)
    with pytest.raises(InstanceTooLarge, match=r"K=4 clients and M=16 subchannels.*limit"):
        solve_link_exact(link, np.zeros(4), 1e6)


# ------------------------------------------------------------------ feasibility of every method


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    K=st.integers(1, 5),
    extra=st.integers(0, 6),
    p_th_factor=st.sampled_from([0.05, 0.3, 1.0, 3.0]),
)
def test_every_method_returns_a_feasible_allocation(seed, K, extra, p_th_factor):
    rng = np.random.default_rng(seed)
    M = K + extra
    link = make_link(rng, K, M, p_th_factor=p_th_factor)
    c, D = rng.uniform(0, 2, K), float(rng.uniform(1e5, 1e8))
    proposed = solve_link(link, c, D)
    assert_feasible(link, proposed, c, D)
    greedy = power_control(link, greedy_assignment(link, c, D), c, D)
    assert_feasible(link, greedy, c, D)
    assert proposed.value_s <= greedy.value_s * (1 + 1e-12), "the local search never makes things worse"
    owner = random_assignment(rng, K, M)
    assert_feasible(link, power_control(link, owner, c, D), c, D)
    power = equal_power(link, owner)
    per_client = np.bincount(owner, weights=power, minlength=K)
    assert np.all(per_client <= link.p_max_w) and power.sum() <= link.p_th_w


def test_equal_power_spreads_pmax_and_scales_to_pth():
    link = Link(np.ones((2, 3)), W, N0, np.array([0.3, 0.2]), 10.0)
    owner = np.array([0, 1, 0])
    np.testing.assert_allclose(equal_power(link, owner), [0.15, 0.2, 0.15])
    tight = Link(np.ones((2, 3)), W, N0, np.array([0.3, 0.2]), 0.25)
    np.testing.assert_allclose(equal_power(tight, owner), np.array([0.15, 0.2, 0.15]) / 2, rtol=1e-12)


# ------------------------------------------------------------------ random assignment


def test_random_assignment_is_seeded_and_covers_every_client():
    a = random_assignment(np.random.default_rng(3), 5, 12)
    b = random_assignment(np.random.default_rng(3), 5, 12)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) == set(range(5))
    # K = M = 20: rejection almost never succeeds; the exact sampler takes over and gives a permutation
    assert sorted(random_assignment(np.random.default_rng(0), 20, 20).tolist()) == list(range(20))


@pytest.mark.parametrize("K, M", [(50, 128), (5, 12), (3, 7), (1, 4), (8, 31), (2, 2), (6, 8), (10, 20),
                                  (20, 48), (30, 90), (40, 100), (64, 200)])
@pytest.mark.parametrize("generator", [np.random.PCG64, np.random.PCG64DXSM, np.random.Philox])
def test_batched_redraw_is_the_plain_redraw_loop(K, M, generator):
    """random_assignment's batched rejection gives the spec's loop's draws and leaves the generator
    in the same state (also when a spare 32-bit half is buffered before it).  Shapes span the
    plain-loop, batched and (K = M = 2 aside) near-threshold regimes; Philox takes the fallback."""

    def plain(rng):
        while True:
            owner = rng.integers(0, K, size=M)
            if np.bincount(owner, minlength=K).min() > 0:
                return owner

    if math.exp(L._log_covering(K, M)[M, K]) < 1e-3:
        pytest.skip("the exact covering sampler is used, not rejection")
    for seed in range(40):
        ours, reference = np.random.Generator(generator(seed)), np.random.Generator(generator(seed))
        for i in range(4):
            if i == 2:
                ours.integers(5), reference.integers(5)  # an odd number of 32-bit halves so far
            np.testing.assert_array_equal(random_assignment(ours, K, M), plain(reference))
            np.testing.assert_equal(ours.bit_generator.state, reference.bit_generator.state)


def test_pcg_state_model_matches_numpy_and_detects_rejections():
    for draws, high in [(1, 7), (6, 50), (7, 50), (128, 2)]:
        for spare in (False, True):
            rng = np.random.default_rng(draws)
            if spare:
                rng.integers(3)
            start = rng.bit_generator.state
            rng.integers(0, high, size=draws)
            assert L._pcg_after(rng.bit_generator, start, draws) == rng.bit_generator.state
    rng = np.random.default_rng(0)  # a range of 3 * 2^30 rejects a quarter of the raw values
    start = rng.bit_generator.state
    rng.integers(0, 3 * 2**30, size=64)
    assert L._pcg_after(rng.bit_generator, start, 64) != rng.bit_generator.state


def test_covering_sampler_is_uniform():
    """The no-rejection sampler draws every covering assignment equally often (chi-square test)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    draws = 6000
    counts: dict[tuple, int] = {}
    for _ in range(draws):
        key = tuple(L._uniform_covering(rng, 2, 3).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6  # 2^3 assignments minus the 2 that leave a client out
    assert scipy_stats.chisquare(list(counts.values())).pvalue > 1e-3
