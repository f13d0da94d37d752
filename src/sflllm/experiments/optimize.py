"""The ``sflllm optimize`` run: load and realise a scenario, optimise, print/write the results.

Nothing is written unless the whole run succeeds (the realised scenario and the figures are
written last, each file atomically). No torch; matplotlib only with ``plot_dir``.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from sflllm.allocation.optimize import MethodError, Outcome, check_size, optimise, phases
from sflllm.allocation.report import render, result_json
from sflllm.allocation.scenario import Realised, ScenarioError, load_scenario, realise, write_text_atomic


class OptimizeInputError(ValueError):
    """Bad input to ``sflllm optimize`` (scenario, method or output path); the message names it."""


@dataclass(frozen=True)
class OptimizeRun:
    outcome: Outcome
    result: dict
    figures: tuple[Path, ...]


#: K (M + N) from which ``sflllm optimize`` shows its progress on stderr: the solve then takes a second
#: or more on a 2-core machine (K = 1,000, M = N = 2,730 is 5.5 million and takes about 3 s; K = 200,
#: M = N = 546 is 0.2 million and 0.3 s).
PROGRESS_MIN_SIZE = 1_000_000


@contextlib.contextmanager
def _phase_progress(realised: Realised, method: str, show: bool):
    """An ``on_phase`` callback for :func:`optimise` that shows a rich progress bar on stderr while the
    phases run, for a large scenario (``PROGRESS_MIN_SIZE``); None (nothing shown) otherwise."""
    network = realised.scenario.network
    if not show or realised.num_clients * (network.ms_subchannels + network.fs_subchannels) < PROGRESS_MIN_SIZE:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps = phases(method)
    columns = (TextColumn("sflllm optimize: {task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=len(steps))

        def on_phase(name: str) -> None:
            progress.update(task, description=name.replace("_", " "), completed=steps.index(name))

        yield on_phase


def run_optimize(scenario_path: Path, *, method: str = "proposed", plot_dir: Path | None = None,
                 save_realised: Path | None = None, progress: bool = False) -> OptimizeRun:
    """Optimise the scenario with ``method`` (and every baseline); optionally save figures/realised file.

    ``progress``: show the phases on stderr (rich) when the scenario is large enough for the solve to
    take a second or more (``PROGRESS_MIN_SIZE``); stdout is left alone.
    """
    if save_realised is not None and save_realised.is_dir():
        raise OptimizeInputError(f"--save-realised: {save_realised} is a folder, not a file")
    if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
        raise OptimizeInputError(f"--plot: {plot_dir} exists and is not a folder")
    if save_realised is not None and not save_realised.parent.is_dir():
        raise OptimizeInputError(f"--save-realised: folder {save_realised.parent} does not exist")
    try:
        scenario = load_scenario(scenario_path)
        check_size(scenario)  # before realise draws K x M gains
        realised = realise(scenario)
        with _phase_progress(realised, method, progress) as on_phase:
            outcome = optimise(realised, method, on_phase=on_phase)
    except (ScenarioError, MethodError) as exc:
        raise OptimizeInputError(str(exc)) from None
    result = result_json(outcome)
    figures: tuple[Path, ...] = ()
    if plot_dir is not None:
        from sflllm.experiments.optimize_figures import write_figures

        figures = write_figures(outcome, plot_dir)
    if save_realised is not None:
        write_text_atomic(save_realised, realised.to_yaml())
    return OptimizeRun(outcome=outcome, result=result, figures=figures)


def write_json_line(result: dict) -> None:
    """``result`` as one line of JSON on stdout, encoded by orjson.

    A city-scale result holds millions of floats (the realised gains): the standard library's encoder
    spends about 1 us per float (7 s at K = 1,000, M = N = 2,730), orjson 0.1 us.  Floats are written
    in their shortest round-trip form, so ``json.loads`` gives back the same numbers bit for bit.
    """
    import orjson

    sys.stdout.flush()
    stream = getattr(sys.stdout, "buffer", None)
    data = orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    if stream is None:  # a text-only stdout (e.g. io.StringIO)
        sys.stdout.write(data.decode("utf-8"))
    else:
        stream.write(data)
        stream.flush()


def print_run(run: OptimizeRun, *, as_json: bool) -> None:
    """One JSON object on stdout (``--json``; rich is not imported then) or the rich tables."""
    if as_json:
        write_json_line(run.result)
        return
    from rich.console import Console

    console = Console()
    render(run.outcome, console)
    for path in run.figures:
        console.print(f"wrote {path}")
