"""``sflllm calibrate``: measure E(r), the rounds each LoRA rank needs to reach a target held-out loss.

For every rank r in the scenario's rank set, SFL is trained with the scenario's K, I, b, s (and its
seed and act_bits) at one split layer (``--split-layer``, default the middle block floor(L/2)), for
``--max-rounds`` rounds, with the held-out loss after every round (``DIR/runs/rank-<r>/`` holds each
run, as ``sflllm train`` writes it). E(r) is the first round whose held-out loss is at or below the
target: ``--target-loss``, or by default the best final loss over the ranks plus
:data:`DEFAULT_MARGIN` of the largest loss drop (initial minus best final), said in the output.
A rank that never reaches the target is left out of the table, with a warning.

Outputs in ``DIR``:

* ``rounds_per_rank.yaml``: a scenario fragment (``training: {ranks, rounds_per_rank}``) with only
  the ranks that reached the target. Merge it into a scenario file (its keys are scenario keys:
  replace the file's ``training.ranks`` and ``training.rounds_per_rank`` with it), or pass the folder to
  ``sflllm run --calibration DIR``, which does that merge and also checks that the calibration was
  measured on the same model, K, I, b, s, act_bits, data and seed;
* ``calibration.json``: the table, the target, the unreached ranks and what it was measured on;
* ``curves.csv`` (rank, round, heldout_loss, train_loss) and ``calibration.png`` (held-out loss
  against rounds, one line per rank, the target drawn).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sflllm.allocation.scenario import ScenarioError, realise
from sflllm.experiments.checkpoint import write_atomic, write_json_atomic
from sflllm.experiments.run_options import CalibrateOptions, cut_bits
from sflllm.experiments.run_inputs import (
    load_run_scenario,
    pair_train_config,
    train_pair,
    architecture_digest,
    check_ranks,
    data_source,
    model_profile,
    model_source,
    output_folder,
    saved_options,
)
from sflllm.experiments.config import TrainInputError, config_to_yaml
from sflllm.experiments.train import load_model_and_tokenizer, prepare

CALIBRATION_FILE = "calibration.json"
FRAGMENT_FILE = "rounds_per_rank.yaml"
CURVES_FILE = "curves.csv"
FIGURE_FILE = "calibration.png"
OPTIONS_FILE = "calibrate.yaml"
RUNS_DIR = "runs"
DEFAULT_MARGIN = 0.05  # share of the loss drop (initial - best final) added to the best final loss
CALIBRATION_SCHEMA = "sflllm.calibration/1"


@dataclass(frozen=True)
class CalibrationResult:
    output_dir: Path
    calibration: dict[str, Any]


def rounds_to_reach(losses: list[float], target: float) -> int | None:
    """E: the first round (1-based) whose held-out loss is at or below ``target``; None if none is."""
    return next((t for t, loss in enumerate(losses, start=1) if loss <= target), None)


def default_target(initial: float, finals: list[float], margin: float = DEFAULT_MARGIN) -> float:
    """The best final loss plus ``margin`` of the drop from the initial loss to it."""
    best = min(finals)
    return best + margin * max(initial - best, 0.0)


def rounds_table(curves: dict[int, list[float]], target: float) -> tuple[dict[int, int], list[int]]:
    """(E(r) for every rank that reaches ``target``, the ranks that do not)."""
    table, unreached = {}, []
    for rank, losses in sorted(curves.items()):
        e = rounds_to_reach(losses, target)
        if e is None:
            unreached.append(rank)
        else:
            table[rank] = e
    return table, unreached


def fragment_yaml(table: dict[int, int], target: float, source: str) -> str:
    """The scenario fragment: ``training: {ranks: [...], rounds_per_rank: {r: E}}`` with a comment header."""
    ranks = ", ".join(str(r) for r in table)
    rounds = ", ".join(f"{r}: {e}" for r, e in table.items())
    return (f"# E(r) measured by `sflllm calibrate` on {source}: first round with held-out loss <= {target:.6g}.\n"
            "# Scenario keys: replace a scenario's training.ranks and training.rounds_per_rank with these,\n"
            "# or pass this folder to `sflllm run --calibration DIR`.\n"
            f"training:\n  ranks: [{ranks}]\n  rounds_per_rank: {{{rounds}}}\n")


def read_calibration(folder: Path) -> dict[str, Any]:
    """``calibration.json`` of an ``sflllm calibrate`` folder (its E(r) table and what it was measured on)."""
    path = Path(folder) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainInputError(f"calibration: {path} not found; is {folder} the output of `sflllm calibrate`?") from None
    except (OSError, ValueError) as e:
        raise TrainInputError(f"calibration: cannot read {path}: {e}") from None
    if not isinstance(data, dict) or "rounds_per_rank" not in data:
        raise TrainInputError(f"calibration: {path} is not an `sflllm calibrate` result")
    return data


def run_calibrate(options: CalibrateOptions, output_dir: Path | None = None, *, console: Console | None = None,
                  progress: bool = True, resume: bool = False) -> CalibrationResult:
    """Train every rank, derive E(r), write the fragment, curves and figure."""
    console = console or Console(soft_wrap=True)
    out = output_folder(output_dir, resume=resume, options_file=OPTIONS_FILE, command="calibrate")
    if resume:
        options = saved_options(out, OPTIONS_FILE, CalibrateOptions)

    scenario = load_run_scenario(options)
    act_bits = cut_bits(options, scenario)
    scenario = scenario.model_copy(update={"model": scenario.model.model_copy(update={"act_bits": act_bits})})
    model, _ = load_model_and_tokenizer(pair_train_config(options, scenario, 1, 1, 32, 1))
    profile = model_profile(model, scenario.model.lora_targets)
    L = profile.num_layers
    split_layer = options.split_layer if options.split_layer is not None else max(1, L // 2)
    if not 1 <= split_layer <= L - 1:
        raise TrainInputError(f"split_layer: {split_layer} is outside 1..{L - 1} (the model has L = {L} blocks)")
    ranks = list(scenario.training.ranks)
    check_ranks(ranks, profile)
    try:
        realise(scenario, profile)  # the scenario against this model: seq_len vs positions, split layers
    except ScenarioError as e:
        raise TrainInputError(str(e)) from None
    configs = {r: pair_train_config(options, scenario, split_layer, r, act_bits, options.max_rounds)
               for r in ranks}
    prepare(configs[ranks[0]])  # data and partition errors before anything is written

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_atomic(out / OPTIONS_FILE, config_to_yaml(options).encode("utf-8"))
    training = scenario.training
    console.print(f"calibrating E(r) for ranks {ranks} at split layer {split_layer}: K={scenario.clients.count}, "
                  f"I={training.local_steps}, b={training.batch_size}, s={scenario.model.seq_len}, "
                  f"up to {options.max_rounds} rounds each", highlight=False)
    traces = {}
    for n, r in enumerate(ranks, start=1):
        console.print(f"[bold]rank {r}[/] ({n}/{len(ranks)})", highlight=False)
        (out / RUNS_DIR).mkdir(exist_ok=True)
        traces[r] = train_pair(out / RUNS_DIR / f"rank-{r}", configs[r], console, progress).metrics

    curves = {r: [row["heldout_loss"] for row in t["rounds"][: options.max_rounds]] for r, t in traces.items()}
    initial = max(t["initial"]["heldout_loss"] for t in traces.values())
    if options.target_loss is not None:
        target, how = options.target_loss, "--target-loss"
    else:
        target = default_target(initial, [c[-1] for c in curves.values()])
        how = (f"best final loss {min(c[-1] for c in curves.values()):.4f} + {DEFAULT_MARGIN:.0%} of the drop from "
               f"{initial:.4f}")
    table, unreached = rounds_table(curves, target)
    source = model_source(options.model)
    calibration = {
        "schema": CALIBRATION_SCHEMA, "model": source, "architecture": architecture_digest(profile),
        "clients": scenario.clients.count, "local_steps": training.local_steps, "batch_size": training.batch_size,
        "seq_len": scenario.model.seq_len, "act_bits": act_bits, "dtype": options.dtype, "seed": scenario.seed,
        "data": data_source(options.data), "eval_data": data_source(options.eval_data),
        "train_samples": options.train_samples, "split_layer": split_layer,
        "max_rounds": options.max_rounds, "target_loss": target, "target_source": how,
        "rounds_per_rank": {str(r): e for r, e in table.items()}, "unreached_ranks": unreached,
        "initial_heldout_loss": initial, "final_heldout_loss": {str(r): c[-1] for r, c in curves.items()},
    }
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("rank", "round", "heldout_loss", "train_loss"))
    for r, t in traces.items():
        for row in t["rounds"][: options.max_rounds]:
            writer.writerow((r, row["round"], repr(row["heldout_loss"]), repr(row["train_loss"])))
    write_atomic(out / CURVES_FILE, buf.getvalue().encode("utf-8"))
    _write_figure(out / FIGURE_FILE, curves, initial, target, split_layer)
    write_atomic(out / FRAGMENT_FILE, fragment_yaml(table, target, source).encode("utf-8"))
    write_json_atomic(out / CALIBRATION_FILE, calibration)

    console.print(f"target held-out loss {target:.4f} ({how})", highlight=False)
    for r in ranks:
        e = table.get(r)
        console.print(f"  rank {r}: E = {e if e is not None else 'not reached'} (final loss {curves[r][-1]:.4f})",
                      highlight=False)
    for r in unreached:
        console.print(f"[yellow]warning:[/] rank {r} did not reach {target:.4f} in {options.max_rounds} rounds; "
                      "left out of rounds_per_rank.yaml (raise --max-rounds or the target)", highlight=False)
    console.print(f"wrote {out / FRAGMENT_FILE} ({out / CALIBRATION_FILE}, {CURVES_FILE}, {FIGURE_FILE})",
                  highlight=False, markup=False)
    return CalibrationResult(out, calibration)


def _write_figure(path: Path, curves: dict[int, list[float]], initial: float, target: float, split_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for r, losses in curves.items():
        ax.plot(range(len(losses) + 1), [initial, *losses], marker="o", markersize=3, label=f"rank {r}")
    ax.axhline(target, color="black", linestyle=":", label=f"target {target:.4f}")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"calibration: held-out loss per round (split layer {split_layer})")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


__all__ = ["CalibrateOptions", "CalibrationResult", "default_target", "read_calibration", "rounds_table",
           "run_calibrate"]
