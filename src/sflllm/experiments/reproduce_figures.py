"""Figures of ``sflllm reproduce`` (matplotlib Agg), drawn from the same rows as the CSV files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sflllm.allocation.optimize import BASELINES

STYLE = {  # method -> (colour, marker); proposed stands out
    "proposed": ("tab:red", "o"),
    "equal_power": ("tab:blue", "s"),
    "fixed_split": ("tab:green", "^"),
    "fixed_rank": ("tab:purple", "v"),
    "random_subchannel": ("tab:orange", "D"),
    "random_all": ("tab:gray", "X"),
}


def _value_ticks(ax, axis: Any, x: np.ndarray) -> None:
    """Tick every swept value, in plain numbers (also on a log axis)."""
    if axis.log:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(x, [f"{v:g}" for v in x])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def delay_figure(axis: Any, rows: Sequence[dict[str, Any]]):
    """T_total against ``axis`` for proposed and every baseline; random ones with a +-1 std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    for method in ("proposed", *BASELINES):
        mine = [row for row in rows if row["method"] == method]
        x = np.array([row[axis.column] for row in mine]) / axis.scale
        mean = np.array([row["mean_total_delay_s"] for row in mine]) / 3600
        colour, marker = STYLE[method]
        draws = mine[0]["samples"]
        label = method
        if method.startswith("random"):
            std = np.array([row["std_total_delay_s"] for row in mine]) / 3600
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.18, linewidth=0)
            label = f"{method} (mean ± std, {draws} draws)"
        ax.plot(x, mean, marker=marker, color=colour, label=label, linewidth=2.2 if method == "proposed" else 1.3,
                markersize=5, zorder=3 if method == "proposed" else 2)
    _value_ticks(ax, axis, x)
    ax.set_xlabel(axis.axis_label)
    ax.set_ylabel("total training delay T_total (h)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"total delay against {axis.label}")
    return fig


def split_rank_figure(axis: Any, rows: Sequence[dict[str, Any]], *, split_layers: Sequence[int],
                      ranks: Sequence[int]):
    """Proposed's optimal split layer and rank against ``axis``, one line per channel draw; the y axes
    span the allowed ``split_layers`` and ``ranks``."""
    plt = _pyplot()
    fig, (ax_l, ax_r) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, constrained_layout=True)
    for draw in sorted({row["channel_draw"] for row in rows}):
        mine = [row for row in rows if row["channel_draw"] == draw]
        x = np.array([row[axis.column] for row in mine]) / axis.scale
        label = f"channel draw {draw} (seed {mine[0]['seed']})"
        ax_l.plot(x, [row["split_layer"] for row in mine], marker="o", alpha=0.8, label=label)
        ax_r.plot(x, [row["rank"] for row in mine], marker="s", alpha=0.8, label=label)
    ax_l.set_ylabel("optimal split layer l")
    ax_r.set_ylabel("optimal LoRA rank r")
    ax_l.set_ylim(min(split_layers) - 0.5, max(split_layers) + 0.5)
    ax_l.yaxis.get_major_locator().set_params(integer=True)
    ax_r.set_yscale("log", base=2)
    ax_r.set_yticks(list(ranks), [str(r) for r in ranks])
    ax_r.set_ylim(min(ranks) / 1.3, max(ranks) * 1.3)
    ax_r.minorticks_off()
    for ax in (ax_l, ax_r):
        _value_ticks(ax, axis, x)
        ax.grid(alpha=0.3)
    ax_r.set_xlabel(axis.axis_label)
    ax_l.legend(fontsize=8)
    ax_l.set_title(f"proposed: optimal (l, r) against {axis.label}")
    return fig


def save_figure(fig, path: Path) -> Path:
    """Save ``fig`` as a PNG (into the run's staging folder, so never seen half-written) and close it."""
    plt = _pyplot()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
