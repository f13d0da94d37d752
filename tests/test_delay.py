"""Spec §4 delays and the §8 breakdown against a straightforward per-client computation."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sflllm.cost.delay import SystemTimes, evaluate_delay
from sflllm.cost.profile import CostNumbers


def _by_hand(n, b, I, E, f, f_s, R_s, R_f, Rdl_s, Rdl_f):
    K = len(f)
    t_up = [b * n["F_c"] / f[k] + b * (n["A"] + n["Y"]) / R_s[k] for k in range(K)]
    t_down = [b * n["G"] / Rdl_s[k] + b * n["B_c"] / f[k] for k in range(K)]
    t_iter = max(t_up) + K * b * n["S"] / f_s + max(t_down)
    t_agg = max(n["Lam"] / r for r in Rdl_f) + max(n["Lam"] / r for r in R_f)
    return t_up, t_down, t_iter, I * t_iter + t_agg, E * (I * t_iter + t_agg)



@settings(max_examples=40, deadline=None)
@given(K=st.integers(1, 6), seed=st.integers(0, 2**31), disabled=st.booleans())
def test_delays_match_a_straightforward_computation(K, seed, disabled):
    rng = np.random.default_rng(seed)
    n = dict(zip(("F_c", "B_c", "S", "A", "Y", "G", "Lam"), rng.uniform(1e6, 1e10, 7)))
    b, I, E = int(rng.integers(1, 9)), int(rng.integers(1, 30)), int(rng.integers(1, 90))
    f, f_s = rng.uniform(1e11, 1e13, K), float(rng.uniform(1e12, 1e14))
    R_s, R_f = rng.uniform(1e5, 1e8, K), rng.uniform(1e5, 1e8, K)
    Rdl_s, Rdl_f = (np.full(K, np.inf), np.full(K, np.inf)) if disabled else (rng.uniform(1e5, 1e8, K),
                                                                              rng.uniform(1e5, 1e8, K))
    report = evaluate_delay(CostNumbers(**n), SystemTimes(b, I, E, f, f_s), rate_ms_bps=R_s, rate_fs_bps=R_f,
                            downlink_rate_ms_bps=Rdl_s, downlink_rate_fs_bps=Rdl_f)
    t_up, t_down, t_iter, t_round, t_total = _by_hand(n, b, I, E, f, f_s, R_s, R_f, Rdl_s, Rdl_f)
    np.testing.assert_allclose(report.uplink_s, t_up, rtol=1e-12)
    np.testing.assert_allclose(report.downlink_s, t_down, rtol=1e-12)
    assert math.isclose(report.iteration_delay_s, t_iter, rel_tol=1e-12)
    assert math.isclose(report.round_delay_s, t_round, rel_tol=1e-12)
    assert math.isclose(report.total_delay_s, t_total, rel_tol=1e-12)
    parts = report.breakdown
    assert set(parts) == {"client_compute_s", "uplink_s", "server_compute_s", "downlink_s", "aggregation_s"}
    assert math.isclose(sum(parts.values()), report.total_delay_s, rel_tol=1e-12)
    assert all(value >= 0 for value in parts.values())
    if disabled:
        assert parts["downlink_s"] == 0.0
    k_up = int(np.argmax(t_up))
    assert math.isclose(parts["uplink_s"], E * I * b * (n["A"] + n["Y"]) / R_s[k_up], rel_tol=1e-12)
    assert math.isclose(parts["server_compute_s"], E * I * K * b * n["S"] / f_s, rel_tol=1e-12)
