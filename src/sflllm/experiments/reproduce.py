"""``sflllm reproduce``: the paper-style simulation study of the delay model (spec §§2-5).

The study sweeps one scenario field at a time around a base scenario (the spec §6 defaults, or
``--scenario``) and runs the optimiser (:func:`sflllm.allocation.optimize.optimise`: proposed and
every baseline) at every point. Nothing here re-evaluates a delay: every number is the optimiser's.

Sweep design (``StudyConfig``; every value is in SI units):

====================  ==========================================  =====================================
axis                  field(s) set at each point                  default values
====================  ==========================================  =====================================
``clients``           clients.count = K (M = N = max(64, K_max,   2, 5, 10, 20, 30, 40, 50
                      the base's M/N); clients nested, below)
``bandwidth``         network.ms_subchannel_hz = fs_subchannel_hz 0.1, 0.2, 0.5, 1, 2, 5 MHz
``client_power``      clients.p_max_w (every client)              0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1 W
``client_compute``    clients.flops: mean f[k] (each client keeps 0.2, 0.5, 1, 2, 5, 10, 20 TFLOP/s
                      its draw's ratio to the mean)
``server_compute``    server.flops = f_s                          1, 2, 5, 10, 20, 50, 100 TFLOP/s
====================  ==========================================  =====================================

Channel draws: every point is evaluated on ``channel_draws`` realisations of the base scenario,
with seeds ``seed, seed + 1, ...`` (``realise``, spec §6 "Draws"). Each realisation is drawn once
and its values (client FLOP/s, distances, shadowing, K x M gains) are written out explicitly, then
only the swept field changes along a curve: every point of a sweep sees the same channel, so the
curves are comparable point by point. The clients sweep realises K_max clients once and keeps the
first K of them (their gains on all M subchannels), so its clients are nested. The random
baselines draw from ``default_rng(seed + 1)`` of that realisation (spec §5), ``random_draws``
times per point.

Statistics (``delay_vs_<axis>.csv``): for a deterministic method, the mean, std, min and max of
T_total over the channel draws; for a random baseline over every (channel draw, random draw), so its
mean equals the mean over channel draws of the optimiser's reported mean. ``reductions.md`` gives
proposed's reduction 1 - mean T_proposed / mean T_baseline at each point, summarised per axis.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sflllm.allocation.optimize import BASELINES, MethodError, Outcome, optimise
from sflllm.allocation.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    realise,
    scenario_profile,
    scenario_to_yaml,
)
from sflllm.experiments.config import TrainInputError
from sflllm.experiments.reproduce_accuracy import (
    ACCURACY_CSV,
    ACCURACY_DIR,
    ACCURACY_TABLE,
    AccuracySettings,
    accuracy_configs,
    accuracy_markdown,
    run_accuracy,
)

METHODS = ("proposed",) + BASELINES
RANDOM_METHODS = ("random_subchannel", "random_all")
CLIENTS_SWEEP_SUBCHANNELS = 64  # M = N in the clients sweep (at least K_max)
REDUCTIONS_FILE = "reductions.md"
STUDY_FILE = "study.json"
BASE_SCENARIO_FILE = "base_scenario.yaml"


class ReproduceInputError(ValueError):
    """Bad input to ``sflllm reproduce`` (an option, the scenario, the output folder); names it."""


# ------------------------------------------------------------------------------------------ design

@dataclass(frozen=True)
class Axis:
    """One swept quantity: its CSV column, plot label and the display scale of its values."""

    name: str
    column: str          # CSV column of the value, in SI units
    sets: str            # the scenario field(s) a point sets
    label: str           # what it is, for plots and tables
    unit: str            # the unit shown: values divided by ``scale``
    scale: float
    log: bool            # log-scaled x axis
    values: tuple[float, ...]

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def show(self, value: float) -> str:
        """``value`` in the shown unit: ``bandwidth = 0.1 MHz``."""
        name = "K" if self.name == "clients" else self.name.replace("_", " ")
        return f"{name} = {value / self.scale:g}{' ' + self.unit if self.unit else ''}"


AXES: dict[str, Axis] = {axis.name: axis for axis in (
    Axis("clients", "clients", "clients.count (the first K clients of a K_max draw)", "number of clients K", "", 1.0, False, (2, 5, 10, 20, 30, 40, 50)),
    Axis("bandwidth", "subchannel_hz", "network.ms_subchannel_hz and network.fs_subchannel_hz",
         "subchannel bandwidth W_s = W_f", "MHz", 1e6, True,
         (1e5, 2e5, 5e5, 1e6, 2e6, 5e6)),
    Axis("client_power", "p_max_w", "clients.p_max_w (every client)", "maximum client power Pmax", "W", 1.0, True,
         (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
    Axis("client_compute", "client_flops_mean", "clients.flops, scaled to this mean", "mean client compute f[k]", "TFLOP/s", 1e12, True,
         (2e11, 5e11, 1e12, 2e12, 5e12, 1e13, 2e13)),
    Axis("server_compute", "server_flops", "server.flops", "server compute f_s", "TFLOP/s", 1e12, True,
         (1e12, 2e12, 5e12, 1e13, 2e13, 5e13, 1e14)),
)}
SPLIT_RANK_AXES = ("client_compute", "bandwidth")  # the optimal (l, r) is plotted against these


@dataclass(frozen=True)
class StudyConfig:
    """What the study sweeps. ``values`` per axis name; ``random_draws=None`` keeps the scenario's."""

    seed: int = 0
    channel_draws: int = 5
    random_draws: int | None = None
    values: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {name: axis.values for name, axis in AXES.items()})

    def quick(self) -> "StudyConfig":
        """Three values per axis (first, middle, last) and one channel draw: a smoke run."""
        values = {name: tuple(sorted({v[0], v[len(v) // 2], v[-1]})) for name, v in self.values.items()}
        return replace(self, channel_draws=1, values=values)

    @property
    def num_points(self) -> int:
        """Optimiser runs: every value of every axis, on every channel draw."""
        return self.channel_draws * sum(len(v) for v in self.values.values())

    def describe(self, base: Scenario) -> dict[str, Any]:
        """The design as written to ``study.json`` (``base`` supplies the default number of random draws)."""
        return {"seed": self.seed, "channel_draws": self.channel_draws,
                "channel_seeds": [self.seed + c for c in range(self.channel_draws)],
                "random_draws": self.random_draws or base.baselines.random_draws,
                "axes": {name: {"sets": AXES[name].sets, "csv_column": AXES[name].column,
                                "values": [_csv_value(name, v) for v in values]}
                         for name, values in self.values.items()}}


def check_study(config: StudyConfig) -> None:
    """Errors that name the option: counts below 1, unknown axes, values outside their range."""
    if config.seed < 0:
        raise ReproduceInputError(f"--seed: must be >= 0, got {config.seed}")
    if config.channel_draws < 1:
        raise ReproduceInputError(f"--channel-draws: must be >= 1, got {config.channel_draws}")
    if config.random_draws is not None and config.random_draws < 1:
        raise ReproduceInputError(f"--random-draws: must be >= 1, got {config.random_draws}")
    for name, values in config.values.items():
        if name not in AXES:
            raise ReproduceInputError(f"study axis {name!r} is unknown (choose from {', '.join(AXES)})")
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise ReproduceInputError(f"study axis {name}: values must be positive numbers, got {list(values)}")
        if name == "clients" and any(v != int(v) for v in values):
            raise ReproduceInputError(f"study axis clients: values must be integers, got {list(values)}")


# ------------------------------------------------------------------------------------- scenarios

def _update(scenario: Scenario, section: str, **values: Any) -> Scenario:
    return scenario.model_copy(update={section: getattr(scenario, section).model_copy(update=values)})


def channel_base(base: Scenario, config: StudyConfig, channel_draw: int, *, clients: int | None = None) -> Scenario:
    """The base scenario realised with seed ``config.seed + channel_draw``, every draw explicit.

    With ``clients``, it is realised for that many clients on max(64, clients, M or N) subchannels
    per link (the clients sweep's base). ``random_draws`` is set when the study overrides it.
    """
    scenario = base.model_copy(update={"seed": config.seed + channel_draw})
    if config.random_draws is not None:
        scenario = _update(scenario, "baselines", random_draws=config.random_draws)
    if clients is not None:
        network = scenario.network
        scenario = _update(_update(scenario, "clients", count=clients), "network",
                           ms_subchannels=max(CLIENTS_SWEEP_SUBCHANNELS, clients, network.ms_subchannels),
                           fs_subchannels=max(CLIENTS_SWEEP_SUBCHANNELS, clients, network.fs_subchannels))
    return realise(scenario).scenario


def _first_clients(explicit: Scenario, count: int) -> Scenario:
    """The first ``count`` clients of a realised (explicit) scenario: every per-client value cut."""
    clients, network = explicit.clients, explicit.network
    first = lambda values: None if values is None else values[:count]  # noqa: E731
    return _update(_update(explicit, "clients", count=count, flops=first(clients.flops),
                           p_max_w=first(clients.p_max_w), distance_ms_m=first(clients.distance_ms_m),
                           distance_fs_m=first(clients.distance_fs_m), memory_bytes=first(clients.memory_bytes)),
                   "network", shadowing_ms_db=first(network.shadowing_ms_db),
                   shadowing_fs_db=first(network.shadowing_fs_db), gains_ms=first(network.gains_ms),
                   gains_fs=first(network.gains_fs))


def point_scenario(explicit: Scenario, axis: str, value: float) -> Scenario:
    """The scenario of one sweep point: ``explicit`` (from :func:`channel_base`) with ``axis`` set to ``value``."""
    if axis == "clients":
        return _first_clients(explicit, int(value))
    if axis == "bandwidth":
        return _update(explicit, "network", ms_subchannel_hz=float(value), fs_subchannel_hz=float(value))
    if axis == "client_power":
        return _update(explicit, "clients", p_max_w=float(value))
    if axis == "client_compute":
        flops = np.asarray(explicit.clients.flops, dtype=float)
        return _update(explicit, "clients", flops=[float(f) for f in flops * (float(value) / flops.mean())])
    if axis == "server_compute":
        return _update(explicit, "server", flops=float(value))
    raise ReproduceInputError(f"study axis {axis!r} is unknown (choose from {', '.join(AXES)})")


# ------------------------------------------------------------------------------------------ study

@dataclass(frozen=True)
class PointResult:
    """One optimiser run: T_total samples per method (random baselines: one per draw) and proposed's (l, r)."""

    axis: str
    value: float
    channel_draw: int
    samples: dict[str, tuple[float, ...]]
    split_layer: int
    rank: int


def point_result(axis: str, value: float, channel_draw: int, outcome: Outcome) -> PointResult:
    samples = {name: outcome.solutions[name].draw_totals_s or (outcome.solutions[name].total_delay_s,)
               for name in METHODS}
    return PointResult(axis=axis, value=float(value), channel_draw=channel_draw, samples=samples,
                       split_layer=outcome.proposed.split_layer, rank=outcome.proposed.rank)


@dataclass(frozen=True)
class Study:
    config: StudyConfig
    base: Scenario
    points: tuple[PointResult, ...]
    wall_time_s: float

    def on(self, axis: str) -> list[PointResult]:
        return [p for p in self.points if p.axis == axis]


def run_study(base: Scenario, config: StudyConfig, *,
              advance: Callable[[str], None] | None = None) -> Study:
    """Optimise every point of every axis on every channel draw; ``advance(description)`` after each."""
    check_study(config)
    start = time.perf_counter()
    points: list[PointResult] = []
    for channel_draw in range(config.channel_draws):
        explicit = None
        for axis, values in config.values.items():
            if axis == "clients":
                scenario_base = _guard(lambda: channel_base(base, config, channel_draw, clients=int(max(values))),
                                       f"clients sweep (K up to {int(max(values))})")
            else:
                if explicit is None:
                    explicit = _guard(lambda: channel_base(base, config, channel_draw), "base scenario")
                scenario_base = explicit
            for value in values:
                where = f"{axis} = {value:g} (channel draw {channel_draw})"
                scenario = _guard(lambda: point_scenario(scenario_base, axis, value), where)
                outcome = _guard(lambda: optimise(realise(scenario)), where)
                points.append(point_result(axis, value, channel_draw, outcome))
                if advance is not None:
                    advance(where)
    return Study(config=config, base=base, points=tuple(points), wall_time_s=time.perf_counter() - start)


def _guard(run: Callable[[], Any], where: str) -> Any:
    """``run()``, with a scenario or method error turned into one line that says which point failed."""
    try:
        return run()
    except (ScenarioError, MethodError) as exc:
        raise ReproduceInputError(f"scenario at {where}: {exc}") from None


# ------------------------------------------------------------------------------------------ tables

def delay_rows(study: Study, axis: str) -> list[dict[str, Any]]:
    """Rows of ``delay_vs_<axis>.csv``: per value and method, T_total statistics over all samples."""
    rows = []
    for value in study.config.values[axis]:
        points = [p for p in study.on(axis) if p.value == float(value)]
        for method in METHODS:
            samples = np.concatenate([p.samples[method] for p in points])
            rows.append({AXES[axis].column: _csv_value(axis, value), "method": method,
                         "mean_total_delay_s": float(samples.mean()), "std_total_delay_s": float(samples.std()),
                         "min_total_delay_s": float(samples.min()), "max_total_delay_s": float(samples.max()),
                         "samples": int(samples.size)})
    return rows


def _csv_value(axis: str, value: float) -> int | float:
    return int(value) if axis == "clients" else float(value)


def split_rank_rows(study: Study, axis: str) -> list[dict[str, Any]]:
    """Rows of ``split_rank_vs_<axis>.csv``: proposed's (l, r) and T_total per value and channel draw."""
    return [{AXES[axis].column: _csv_value(axis, p.value), "channel_draw": p.channel_draw, "seed": study.config.seed + p.channel_draw,
             "split_layer": p.split_layer, "rank": p.rank, "total_delay_s": p.samples["proposed"][0]}
            for p in sorted(study.on(axis), key=lambda p: (p.value, p.channel_draw))]


def reductions(study: Study) -> dict[str, dict[str, list[float]]]:
    """Per baseline and axis: proposed's reduction 1 - mean T_proposed / mean T_baseline at each value."""
    out: dict[str, dict[str, list[float]]] = {name: {} for name in BASELINES}
    for axis in study.config.values:
        means = {(float(row[AXES[axis].column]), row["method"]): row["mean_total_delay_s"]
                 for row in delay_rows(study, axis)}
        for name in BASELINES:
            out[name][axis] = [1.0 - means[(float(v), "proposed")] / means[(float(v), name)]
                               for v in study.config.values[axis]]
    return out


def reductions_markdown(study: Study) -> str:
    """``reductions.md``: per baseline and axis, the mean and the largest reduction over the axis's values."""
    table = reductions(study)
    axes = list(study.config.values)
    config = study.config
    lines = [
        "# Proposed allocation: delay reduction against each baseline",
        "",
        "Reduction = 1 - T_total(proposed) / T_total(baseline), with each T_total the mean over the point's "
        "samples (see `delay_vs_*.csv`); each cell is the mean over the axis's values, and the largest in "
        "brackets.",
        f"Study: seed {config.seed}, {config.channel_draws} channel draw(s) per point, random baselines "
        f"{config.describe(study.base)['random_draws']} draws per point; "
        f"{len(study.points)} optimiser runs in {study.wall_time_s:.1f} s. Design: `{STUDY_FILE}`.",
        "",
        "| baseline | " + " | ".join(a.replace("_", " ") for a in axes) + " | largest |",
        "| --- | " + " | ".join("---:" for _ in axes) + " | ---: |",
    ]
    for name in BASELINES:
        cells = [f"{100 * np.mean(table[name][a]):.1f}% ({100 * max(table[name][a]):.1f}%)" for a in axes]
        largest = max(max(values) for values in table[name].values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * largest:.1f}% |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: repr(v) if isinstance(v, float) else v for key, v in row.items()} for row in rows)
    return stream.getvalue()


# ------------------------------------------------------------------------------------------ output

def check_output(output: Path) -> None:
    """Refuse an output that exists and is not an empty folder, or whose nearest existing parent is not writable."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ReproduceInputError(f"--output: {output} already exists and is not an empty folder; choose another")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ReproduceInputError(f"--output: cannot create {output}: {parent} is not a writable folder")


class Staging:
    """A hidden folder beside ``output`` that becomes ``output`` at :meth:`publish`, or vanishes.

    Everything is written into it first, so a failed or interrupted run leaves nothing in
    ``output``; publishing is one rename (an empty existing ``output`` folder is replaced).
    """

    def __init__(self, output: Path):
        self.output = output
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
        except OSError as exc:
            raise ReproduceInputError(f"--output: cannot write to {output.parent}: {exc.strerror or exc}") from None

    def publish(self) -> Path:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp's folder is private (0o700)
        try:
            os.rename(self.path, self.output)
        except OSError as exc:
            raise ReproduceInputError(f"--output: cannot create {self.output}: {exc.strerror or exc}") from None
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_study(study: Study, folder: Path) -> list[Path]:
    """Every CSV, PNG and table of the study into ``folder``, a :class:`Staging` folder: no file in it is
    seen before the whole folder is published, so the files are written plainly."""
    from sflllm.allocation.report import plain
    from sflllm.experiments.reproduce_figures import delay_figure, save_figure, split_rank_figure

    written = []

    def text(name: str, content: str) -> None:
        (folder / name).write_text(content, encoding="utf-8")
        written.append(folder / name)

    text(STUDY_FILE, json.dumps(plain(study.config.describe(study.base)), indent=2) + "\n")
    text(BASE_SCENARIO_FILE, scenario_to_yaml(study.base))
    for axis in study.config.values:
        rows = delay_rows(study, axis)
        text(f"delay_vs_{axis}.csv", csv_text(rows))
        written.append(save_figure(delay_figure(AXES[axis], rows), folder / f"delay_vs_{axis}.png"))
    for axis in SPLIT_RANK_AXES:
        if axis in study.config.values:
            rows = split_rank_rows(study, axis)
            text(f"split_rank_vs_{axis}.csv", csv_text(rows))
            figure = split_rank_figure(AXES[axis], rows, split_layers=allowed_split_layers(study.base),
                                       ranks=study.base.training.ranks)
            written.append(save_figure(figure, folder / f"split_rank_vs_{axis}.png"))
    text(REDUCTIONS_FILE, reductions_markdown(study))
    return written



def allowed_split_layers(base: Scenario) -> list[int]:
    """training.split_layers, or 1..L-1 of the base scenario's model (spec §6)."""
    if base.training.split_layers is not None:
        return list(base.training.split_layers)
    return list(range(1, scenario_profile(base).num_layers))


def load_base(scenario: Path | None) -> Scenario:
    """The base scenario: ``--scenario`` or the spec §6 defaults."""
    if scenario is None:
        return Scenario()
    try:
        return load_scenario(scenario)
    except ScenarioError as exc:
        raise ReproduceInputError(f"--scenario {scenario}: {exc}") from None


# ----------------------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class ReproduceRun:
    """What ``sflllm reproduce`` wrote (paths inside ``output``) and computed."""

    output: Path
    study: Study
    files: tuple[Path, ...]
    accuracy: list[dict[str, Any]] | None
    wall_time_s: float


def run_reproduce(output: Path, *, base: Scenario | None = None, config: StudyConfig = StudyConfig(),
                  accuracy: AccuracySettings | None = None, console: Any = None,
                  progress: bool = True) -> ReproduceRun:
    """Run the study (and, with ``accuracy``, the four training runs) and publish ``output`` at the end.

    Every input is checked before any work; a failure or an interrupt leaves ``output`` as it was.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    console = console or Console(soft_wrap=True, highlight=False)
    base = base if base is not None else Scenario()
    check_study(config)
    check_output(output)
    try:
        configs = accuracy_configs(accuracy) if accuracy is not None else None
    except TrainInputError as exc:
        raise ReproduceInputError(str(exc)) from None
    staging = Staging(output)
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task("delay study", total=config.num_points)
            study = run_study(base, config,
                              advance=lambda where: bar.update(task, advance=1, description=f"delay study: {where}"))
        files = write_study(study, staging.path)
        rows = None
        if configs is not None:
            try:
                rows = run_accuracy(configs, staging.path / ACCURACY_DIR,
                                    report=lambda line: console.print(line, markup=False))
            except TrainInputError as exc:
                raise ReproduceInputError(str(exc)) from None
            first = next(iter(configs.values()))
            for name, content in ((ACCURACY_TABLE, accuracy_markdown(rows, first)), (ACCURACY_CSV, csv_text(rows))):
                (staging.path / name).write_text(content, encoding="utf-8")
                files.append(staging.path / name)
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    return ReproduceRun(output=output, study=study, files=tuple(output / f.relative_to(staging.path) for f in files),
                        accuracy=rows, wall_time_s=time.perf_counter() - start)


def print_summary(run: ReproduceRun, console: Any) -> None:
    """The reductions (and the accuracy table) as rich tables, and where the files are."""
    from rich.table import Table

    table = Table(title="proposed's delay reduction against each baseline (over every sweep point)")
    table.add_column("baseline")
    table.add_column("mean", justify="right")
    table.add_column("largest", justify="right")
    table.add_column("where largest")
    for name, per_axis in reductions(run.study).items():
        everything = [(value, axis, v) for axis, values in per_axis.items()
                      for v, value in zip(run.study.config.values[axis], values)]
        value, axis, at = max(everything)
        table.add_row(name, f"{100 * np.mean([e[0] for e in everything]):.1f}%", f"{100 * value:.1f}%",
                      AXES[axis].show(at))
    console.print(table)
    if run.accuracy is not None:
        accuracy = Table(title="accuracy (see accuracy.md for the settings)")
        for name in ("mode", "held-out loss", "perplexity", "BLEU", "ROUGE-L"):
            accuracy.add_column(name, justify="left" if name == "mode" else "right")
        for row in run.accuracy:
            accuracy.add_row(row["mode"], f"{row['heldout_loss']:.4f}", f"{row['perplexity']:.3f}",
                             f"{row['bleu']:.2f}", f"{row['rouge_l']:.4f}")
        console.print(accuracy)
    console.print(f"{len(run.study.points)} optimiser runs in {run.study.wall_time_s:.1f} s; {len(run.files)} files "
                  f"in {run.output}/ ({REDUCTIONS_FILE}, delay_vs_*.png/.csv, split_rank_vs_*.png/.csv"
                  f"{', accuracy.md' if run.accuracy is not None else ''}); {run.wall_time_s:.1f} s in all",
                  markup=False)
