"""The ``sflllm optimize`` run: load and realise a scenario, optimise, print/write the results.

Nothing is written unless the whole run succeeds (the realised scenario and the figures are
written last, each file atomically). No torch; matplotlib only with ``plot_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sflllm.allocation.optimize import MethodError, Outcome, check_size, optimise
from sflllm.experiments.optimize_output import phase_progress, write_json_line
from sflllm.allocation.report import render, result_json
from sflllm.allocation.scenario import ScenarioError, load_scenario, realise
from sflllm.files import FileInputError, check_creatable_dir, write_atomic


class OptimizeInputError(ValueError):
    """Bad input to ``sflllm optimize`` (scenario, method or output path); the message names it."""


@dataclass(frozen=True)
class OptimizeRun:
    outcome: Outcome
    result: dict
    figures: tuple[Path, ...]


def run_optimize(scenario_path: Path, *, method: str = "proposed", plot_dir: Path | None = None,
                 save_realised: Path | None = None) -> OptimizeRun:
    """Optimise the scenario with ``method`` (and every baseline); optionally save figures/realised file."""
    try:  # output paths before any work
        if save_realised is not None:
            if save_realised.is_dir():
                raise FileInputError(f"--save-realised {save_realised}: is a folder, not a file")
            if not save_realised.parent.is_dir():
                problem = "is not a folder" if save_realised.parent.exists() else "does not exist"
                raise FileInputError(f"--save-realised {save_realised}: {save_realised.parent} {problem}")
            check_creatable_dir(save_realised.parent, "--save-realised")
        if plot_dir is not None:
            check_creatable_dir(plot_dir, "--plot")
    except FileInputError as exc:
        raise OptimizeInputError(str(exc)) from None
    try:
        scenario = load_scenario(scenario_path)
        check_size(scenario)  # before realise draws K x M gains
        realised = realise(scenario)
        with phase_progress(realised, method) as on_phase:  # on stderr, for a large scenario
            outcome = optimise(realised, method, on_phase=on_phase)
    except (ScenarioError, MethodError) as exc:
        raise OptimizeInputError(str(exc)) from None
    result = result_json(outcome)
    figures: tuple[Path, ...] = ()
    try:
        if plot_dir is not None:
            from sflllm.experiments.optimize_figures import write_figures

            figures = write_figures(outcome, plot_dir)
        if save_realised is not None:
            write_atomic(save_realised, realised.to_yaml().encode("utf-8"))
    except FileInputError as exc:
        raise OptimizeInputError(str(exc)) from None
    return OptimizeRun(outcome=outcome, result=result, figures=figures)


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
