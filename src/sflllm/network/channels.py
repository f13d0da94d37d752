"""Channel model (spec §3): noise, path loss, shadowing, Rayleigh fading and downlink rates. numpy only.

Uplink rates for an assignment and powers are ``sflllm.allocation.link.rates`` (one definition of the
formula for the solver and the reports).
"""

from __future__ import annotations

import numpy as np


def noise_w_per_hz(noise_dbm_per_hz: float) -> float:
    """N0 = 10^((n0_dbm_per_hz - 30) / 10) W/Hz."""
    return 10.0 ** ((noise_dbm_per_hz - 30.0) / 10.0)


def pathloss_db(distance_m: np.ndarray, intercept_db: float, slope_db: float) -> np.ndarray:
    """PL_dB = a + b * log10(dist_m / 1000)."""
    return intercept_db + slope_db * np.log10(np.asarray(distance_m, dtype=float) / 1000.0)


def large_scale_gain(distance_m: np.ndarray, shadowing_db: np.ndarray, intercept_db: float,
                     slope_db: float) -> np.ndarray:
    """gbar = 10^(-PL_dB/10) * 10^(-X/10): the linear gain without fading (one per client)."""
    loss_db = pathloss_db(distance_m, intercept_db, slope_db) + np.asarray(shadowing_db, dtype=float)
    return 10.0 ** (-loss_db / 10.0)


def draw_fading(rng: np.random.Generator, num_clients: int, num_subchannels: int, fading: str) -> np.ndarray:
    """|h|^2 per client and subchannel: Exp(1) i.i.d. for "rayleigh" (drawn), ones for "none" (no draw)."""
    if fading == "rayleigh":
        return rng.exponential(1.0, size=(num_clients, num_subchannels))
    if fading == "none":
        return np.ones((num_clients, num_subchannels))
    raise ValueError(f"network.fading: unknown fading {fading!r} (rayleigh | none)")


def downlink_rates(gain: np.ndarray, *, bandwidth_hz: float, power_w: float,
                   noise_w_per_hz: float) -> np.ndarray:
    """Rdl[k] = (W_dl/K) log2(1 + (P_dl/K) gbar[k] / (N0 W_dl/K)): the band and power split equally."""
    gain = np.asarray(gain, dtype=float)
    k = gain.shape[-1]
    width = bandwidth_hz / k
    return width * np.log2(1.0 + (power_w / k) * gain / (noise_w_per_hz * width))
