"""Training delay (spec §4) and its breakdown by phase (spec §8). numpy only.

The functions broadcast: pass arrays of cost numbers with a trailing axis of length 1 against (K,)
rates to evaluate many (split_layer, rank) pairs at once. A disabled downlink is modelled by
infinite downlink rates, which makes its terms exactly 0 (spec §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sflllm.cost.profile import CostNumbers


def client_forward_delays(F_c, *, batch_size: int, client_flops):
    """b F_c(l,r) / f[k]: the compute part of T_up[k] (the MS link's c[k], spec §5)."""
    return batch_size * np.asarray(F_c, dtype=float) / np.asarray(client_flops, dtype=float)


def client_backward_delays(B_c, *, batch_size: int, client_flops):
    """b B_c(l,r) / f[k]: the compute part of T_down[k]."""
    return batch_size * np.asarray(B_c, dtype=float) / np.asarray(client_flops, dtype=float)


def activation_uplink_bits(A, Y, *, batch_size: int):
    """b (A + Y): the bits each client uploads to the MS per iteration (the MS link's D, spec §5)."""
    return batch_size * (A + Y)


def gradient_downlink_delays(G, *, batch_size: int, downlink_rate_ms_bps):
    """b G / Rdl_s[k]: the communication part of T_down[k]."""
    return batch_size * np.asarray(G, dtype=float) / np.asarray(downlink_rate_ms_bps, dtype=float)


def client_downlink_delays(B_c, G, *, batch_size: int, client_flops, downlink_rate_ms_bps):
    """T_down[k] = b G / Rdl_s[k] + b B_c(l,r) / f[k]."""
    return gradient_downlink_delays(G, batch_size=batch_size, downlink_rate_ms_bps=downlink_rate_ms_bps) + \
        client_backward_delays(B_c, batch_size=batch_size, client_flops=client_flops)


def server_compute_delay(S, *, num_clients: int, batch_size: int, server_flops: float):
    """K b S(l,r) / f_s: the main server's forward and backward for all K batches."""
    return num_clients * batch_size * np.asarray(S, dtype=float) / server_flops


def iteration_delay(uplink_max, server_s, downlink_max):
    """T_iter = max_k T_up[k] + K b S / f_s + max_k T_down[k]."""
    return uplink_max + server_s + downlink_max


def broadcast_delay(Lam, *, downlink_rate_fs_bps):
    """max_k Lam(l,r) / Rdl_f[k]: the FS sends the aggregated client adapter to every client."""
    return np.asarray(Lam, dtype=float) * np.max(1.0 / np.asarray(downlink_rate_fs_bps, dtype=float))


def aggregation_delay(Lam, *, downlink_rate_fs_bps, upload_max_s):
    """T_agg = max_k Lam / Rdl_f[k] + max_k Lam / R_f[k]; ``upload_max_s`` is the second term."""
    return broadcast_delay(Lam, downlink_rate_fs_bps=downlink_rate_fs_bps) + upload_max_s


def round_delay(T_iter, T_agg, *, local_steps: int):
    """T_round = I T_iter + T_agg."""
    return local_steps * T_iter + T_agg


def total_delay(T_round, *, rounds):
    """T_total = E(r) T_round."""
    return rounds * T_round


@dataclass(frozen=True)
class SystemTimes:
    """The quantities of spec §4 that are not cost numbers or rates."""

    batch_size: int          # b
    local_steps: int         # I
    rounds: int              # E(r)
    client_flops: np.ndarray  # f[k]
    server_flops: float      # f_s


@dataclass(frozen=True)
class DelayReport:
    """Spec §4 for one (l, r) and one allocation, with the spec §8 breakdown.

    Breakdown rule (spec §8: "totals over the E(r) rounds at each phase's straggler"): the uplink
    phase's straggler is k_up = argmax_k T_up[k]; its compute b F_c / f[k_up] counts as client compute
    and its b (A+Y) / R_s[k_up] as uplink. Likewise k_down = argmax_k T_down[k] splits T_down into
    downlink (b G / Rdl_s) and client compute (b B_c / f). aggregation_s is the whole T_agg (the FS's
    broadcast and the adapters' upload). Each term is multiplied by E(r) (and by I for per-iteration
    terms), so the five add up to total_delay_s.
    """

    uplink_s: np.ndarray            # T_up[k]
    downlink_s: np.ndarray          # T_down[k]
    adapter_upload_s: np.ndarray    # Lam / R_f[k]
    adapter_broadcast_s: np.ndarray  # Lam / Rdl_f[k]
    server_s: float                 # K b S / f_s
    iteration_delay_s: float
    aggregation_delay_s: float
    round_delay_s: float
    total_delay_s: float
    breakdown: dict[str, float]


def evaluate_delay(numbers: CostNumbers, times: SystemTimes, *, rate_ms_bps, rate_fs_bps,
                   downlink_rate_ms_bps, downlink_rate_fs_bps) -> DelayReport:
    """Every spec §4 delay for one (l, r) with the given uplink and downlink rates (bit/s per client)."""
    b, f = times.batch_size, times.client_flops
    K = len(f)
    forward = client_forward_delays(numbers.F_c, batch_size=b, client_flops=f)
    backward = client_backward_delays(numbers.B_c, batch_size=b, client_flops=f)
    activations = activation_uplink_bits(numbers.A, numbers.Y, batch_size=b) / np.asarray(rate_ms_bps, dtype=float)
    gradients = gradient_downlink_delays(numbers.G, batch_size=b, downlink_rate_ms_bps=downlink_rate_ms_bps)
    t_up = forward + activations   # T_up[k] = b F_c / f[k] + b (A + Y) / R_s[k]
    t_down = gradients + backward  # T_down[k] = b G / Rdl_s[k] + b B_c / f[k]
    server = float(server_compute_delay(numbers.S, num_clients=K, batch_size=b, server_flops=times.server_flops))
    upload = numbers.Lam / np.asarray(rate_fs_bps, dtype=float)
    broadcast = numbers.Lam / np.asarray(downlink_rate_fs_bps, dtype=float)
    t_iter = float(iteration_delay(t_up.max(), server, t_down.max()))
    t_agg = float(aggregation_delay(numbers.Lam, downlink_rate_fs_bps=downlink_rate_fs_bps,
                                    upload_max_s=upload.max()))
    t_round = float(round_delay(t_iter, t_agg, local_steps=times.local_steps))
    t_total = float(total_delay(t_round, rounds=times.rounds))
    k_up, k_down = int(np.argmax(t_up)), int(np.argmax(t_down))
    per_iteration = times.rounds * times.local_steps
    breakdown = {
        "client_compute_s": per_iteration * float(forward[k_up] + backward[k_down]),
        "uplink_s": per_iteration * float(activations[k_up]),
        "server_compute_s": per_iteration * server,
        "downlink_s": per_iteration * float(gradients[k_down]),
        "aggregation_s": times.rounds * t_agg,
    }
    return DelayReport(
        uplink_s=t_up, downlink_s=t_down, adapter_upload_s=upload, adapter_broadcast_s=broadcast,
        server_s=server, iteration_delay_s=t_iter, aggregation_delay_s=t_agg, round_delay_s=t_round,
        total_delay_s=t_total, breakdown=breakdown,
    )
