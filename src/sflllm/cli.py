"""Thin command-line layer: parse options, hand them to ``sflllm.experiments``.

Implementations are imported inside each command so that ``sflllm optimize`` never imports torch,
and ``sflllm train`` checks its options, config file and output folder before torch loads.
The options of ``sflllm train`` are derived from ``TrainConfig``: each field's name, type, default
and description are declared once, there.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sflllm.experiments.config import TrainConfig
from sflllm.experiments.run_options import CalibrateOptions, RunOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Split federated LoRA fine-tuning of LLMs, and the joint resource-allocation optimiser.",
)

# `sflllm train` is defined in this file by the SFL-engine work; `sflllm optimize` by the optimiser work.


def _version(value: bool) -> None:
    if value:
        from sflllm import __version__

        print(f"sflllm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """sflllm: split federated LoRA fine-tuning over communication networks."""


def _option_kind(annotation: Any) -> Any:
    """The command-line type of a field: bool, int or float as declared (an int Literal is int), a
    repeatable ``list[str]`` for tuple fields; str otherwise (Literal choices, "auto", comma-separated
    lists: pydantic checks them)."""
    kinds = [t for t in get_args(annotation) if t is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    kind = kinds[0] if len(kinds) == 1 else str
    if get_origin(kind) is Literal and all(type(v) is int for v in get_args(kind)):
        return int
    if get_origin(kind) is tuple:
        return list[str]
    return kind if kind in (bool, int, float) else str


def _field_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The ``--name`` option of one options-model field: its type, help and default come from the field.

    Every option defaults to None (not given), so that only the flags a user passes override the
    ``--config`` file (train) or a model's defaults (run, calibrate); the help shows the field's own default.
    """
    flag = (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")
    kind = _option_kind(field.annotation)
    if kind is bool:
        flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
    help_text, default = field.description or "", field.default
    if default is None and "; None: " in help_text:
        help_text, default = help_text.split("; None: ", 1)
    shown = str(default).lower() if isinstance(default, bool) else "none" if default == () else str(default)
    option = typer.Option(flag, help=help_text[:1].upper() + help_text[1:] + ".", show_default=shown)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, option])


def _is_list(annotation: Any) -> bool:
    """True for ``list[...]`` and ``list[...] | None``."""
    return any(get_origin(t) is list for t in (annotation, *get_args(annotation)))


def _run_options() -> list[inspect.Parameter]:
    """The options of ``sflllm train`` that are not TrainConfig fields (after them in --help)."""
    options = {
        "output": (Path | None, typer.Option(help="Output dir.", show_default="runs/<timestamp>"), None),
        "resume": (Path | None, typer.Option(help="Continue the run in this output dir (e.g. with a larger --rounds, or a lower --lr after divergence)."), None),
        "force": (bool, typer.Option("--force", help="Train even where the peak memory estimate exceeds the available memory."), False),
        "quiet": (bool, typer.Option("--quiet", help="No progress bars."), False),
    }
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])
            for name, (kind, option, default) in options.items()]


def train(**options: Any) -> None:
    """Fine-tune with split federated LoRA; writes metrics.json, config.yaml and safetensors checkpoints.

    Without --model and --data this runs an offline demo (tiny built-in model, synthetic data).
    Every option but --config, --output, --resume, --force and --quiet is a TrainConfig field (a key of --config).
    """
    import warnings

    from rich.console import Console

    from sflllm.experiments.config import TrainInputError, read_config_file, resolve_config
    from sflllm.experiments.run_dir import check_new_output_dir, check_resumable, default_output_dir
    from sflllm.files import FileInputError

    config, output, resume, force, quiet = (options.pop(k) for k in ("config", "output", "resume", "force", "quiet"))
    flags = {k: v for k, v in options.items() if v is not None}
    for name, value in flags.items():  # list fields (lora_targets) are given comma-separated
        if _is_list(TrainConfig.model_fields[name].annotation):
            flags[name] = [item.strip() for item in value.split(",") if item.strip()]
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        # options, config file and output folder first: their errors come before torch loads (~5 s)
        if resume is not None:
            if config is not None or output is not None:
                raise TrainInputError("--resume continues the run in DIR with its config.yaml; drop --config/--output")
            check_resumable(resume)
        else:
            file_values = read_config_file(config) if config is not None else {}
            cfg = resolve_config(file_values, flags, source=str(config) if config else "options")
            output = output if output is not None else default_output_dir()
            check_new_output_dir(output)
    except TrainInputError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(code=2) from None
    if quiet:
        _hide_loading_bars()
    from sflllm.experiments.train import TrainInterrupted, resume_train, run_train

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: err.print(f"warning: {message}", markup=False)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations peft triggers
        try:
            if resume is not None:
                resume_train(resume, flags, progress=not quiet, force=force)
            else:
                run_train(cfg, output, progress=not quiet, force=force)
        except (TrainInputError, FileInputError) as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(code=2) from None
        except TrainInterrupted as e:
            err.print(str(e), markup=False)
            raise typer.Exit(code=130) from None


_CONFIG_OPTION = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, default=None,
    annotation=Annotated[Path | None, typer.Option("--config", help="YAML 1.2 file of TrainConfig fields; flags override it.")],
)
train.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_CONFIG_OPTION, *(_field_option(name, field) for name, field in TrainConfig.model_fields.items()), *_run_options()]
)
app.command()(train)


@app.command()
def score(
    hyp: Annotated[Path, typer.Option("--hyp", help="System output: one hypothesis per line.")],
    ref: Annotated[Path, typer.Option("--ref", help="References: each MR's references one per line, each MR's block ended by an empty line.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (keys bleu, nist, meteor, rouge_l, cider) instead of a table.")] = False,
    meteor: Annotated[bool, typer.Option("--meteor/--no-meteor", help="METEOR 1.5 (Java; 10-30 s to start) or not.")] = True,
) -> None:
    """Score a system output as the official E2E NLG Challenge scorer does: BLEU, NIST, METEOR, ROUGE-L, CIDEr.

    BLEU, METEOR and ROUGE-L are printed x100, NIST and CIDEr as they are (as the papers print them).
    """
    from rich.console import Console

    from sflllm.experiments.score import print_scores, score_files
    from sflllm.metrics import MetricsError, ScoreInputError

    try:
        scores = score_files(hyp, ref, meteor=meteor, progress=not as_json)
    except (ScoreInputError, MetricsError) as e:  # bad input: exit 2; Java or a jar failing: exit 1
        Console(stderr=True).print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=2 if isinstance(e, ScoreInputError) else 1) from None
    print_scores(scores, as_json=as_json)


@app.command()
def optimize(
    scenario: Annotated[Path, typer.Option("--scenario", help="YAML 1.2 scenario file (spec §6); missing fields take their defaults.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (spec §8) instead of tables.")] = False,
    method: Annotated[str, typer.Option(help="proposed | exact | random_subchannel | equal_power | fixed_split | fixed_rank | random_all.")] = "proposed",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write PNG figures (allocation, delay breakdown, (l, r) search, baselines) into this folder.")] = None,
    save_realised: Annotated[Path | None, typer.Option("--save-realised", help="Write the realised scenario (every draw explicit) to this YAML file.")] = None,
) -> None:
    """Jointly optimise subchannels, power, split layer and LoRA rank to minimise the training delay."""
    import os
    import sys
    import warnings

    # The optimiser's arrays are tiny (K x M): BLAS threads only cost start-up CPU (set before numpy loads).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from sflllm.experiments.optimize import OptimizeInputError, print_run, run_optimize

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        try:
            run = run_optimize(scenario, method=method, plot_dir=plot, save_realised=save_realised)
        except OptimizeInputError as e:
            from rich.console import Console

            Console(stderr=True).print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
    print_run(run, as_json=as_json)


@app.command()
def reproduce(
    output: Annotated[Path | None, typer.Option(help="Output folder: new or empty (default: runs/reproduce-<timestamp>).")] = None,
    scenario: Annotated[Path | None, typer.Option("--scenario", help="Base scenario (YAML, spec §6) the sweeps vary (default: the spec's defaults).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first channel draw (default: the scenario's seed).")] = None,
    channel_draws: Annotated[int | None, typer.Option(help="Channel realisations per sweep point, seeds seed, seed+1, ... (default 5).")] = None,
    random_draws: Annotated[int | None, typer.Option(help="Draws of each random baseline per point (default: the scenario's, 20).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Three values per axis and one channel draw (a smoke run).")] = False,
    accuracy: Annotated[bool, typer.Option("--accuracy", help="Also train SFL, centralized, FL and SL on a real model and tabulate loss, perplexity, BLEU, ROUGE-L.")] = False,
    model: Annotated[str | None, typer.Option(help="With --accuracy: HF model dir or name (default: ../shared/data's stories260K).")] = None,
    data: Annotated[str | None, typer.Option(help="With --accuracy: training data (default: ../shared/data's E2E devset).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="With --accuracy: held-out data (default: E2E testset_w_refs).")] = None,
    accuracy_rounds: Annotated[int | None, typer.Option(help="With --accuracy: training rounds of each mode (default 4).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """The paper-style simulation study of the delay model: PNG + CSV per figure and reductions.md."""
    import os
    import time

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in `optimize`: tiny arrays (before numpy loads)
    from rich.console import Console

    from sflllm.experiments.reproduce import ReproduceInputError, StudyConfig, load_base, print_summary, run_reproduce
    from sflllm.experiments.reproduce_accuracy import AccuracySettings, resolve_sources

    import signal
    import sys

    # A SIGTERM unwinds like Ctrl-C, so the run's staging folder is removed (nothing half-written).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if not accuracy and (model, data, eval_data) != (None, None, None):
            raise ReproduceInputError("--model/--data/--eval-data apply only with --accuracy")
        if accuracy_rounds is not None and (not accuracy or accuracy_rounds < 1):
            raise ReproduceInputError(f"--accuracy-rounds: must be >= 1 and go with --accuracy, got {accuracy_rounds}")
        base = load_base(scenario)
        given = {"channel_draws": channel_draws, "random_draws": random_draws}
        study = StudyConfig(seed=base.seed if seed is None else seed,
                            **{key: value for key, value in given.items() if value is not None})
        settings = None
        if accuracy:
            from sflllm.experiments.config import TrainInputError

            rounds = {} if accuracy_rounds is None else {"rounds": accuracy_rounds}
            try:
                settings = AccuracySettings(*resolve_sources(model, data, eval_data), **rounds)
            except TrainInputError as e:
                raise ReproduceInputError(str(e)) from None
        console = Console(soft_wrap=True, highlight=False)
        run = run_reproduce(output or Path("runs") / time.strftime("reproduce-%Y%m%d-%H%M%S"), base=base,
                            config=study.quick() if quick else study, accuracy=settings, console=console,
                            progress=not quiet)
    except ReproduceInputError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(code=2) from None
    print_summary(run, console)


def _hide_loading_bars() -> None:
    """--quiet also hides the weight-loading and download bars of transformers / huggingface_hub (process-wide)."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _report_errors(work) -> None:
    """Run ``work()``; a TrainInputError becomes one ``error:`` line on stderr and exit code 2."""
    import warnings

    from rich.console import Console

    from sflllm.experiments.config import TrainInputError
    from sflllm.files import FileInputError

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: err.print(f"warning: {message}", markup=False)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        try:
            work()
        except (TrainInputError, FileInputError) as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(code=2) from None


_COMMON_OPTIONS = {
    "output": (Path | None, typer.Option(help="Output dir.", show_default="runs/<timestamp>")),
    "resume": (Path | None, typer.Option(help="Continue the interrupted work in this output dir (with its saved options).")),
    "quiet": (bool | None, typer.Option("--quiet", help="No progress bars.", show_default=False)),
}


def _launch(cls: type[BaseModel], module: str, function: str, options: dict[str, Any]) -> None:
    """Validate the given ``options`` into ``cls`` and call ``module.function`` (or resume DIR with its
    saved options); bad input is one ``error:`` line and exit code 2."""
    output, resume, quiet = (options.pop(k) for k in ("output", "resume", "quiet"))
    if quiet:
        _hide_loading_bars()
    flags = {k: v for k, v in options.items() if v is not None}

    def work() -> None:
        import importlib

        from pydantic import ValidationError

        from sflllm.experiments.config import TrainInputError, describe_validation_error

        if resume is not None:
            if flags or output is not None:
                dropped = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(flags)) or "--output"
                raise TrainInputError(f"--resume continues DIR with its saved options; drop {dropped}")
            validated = cls()
        else:
            try:  # the options model is torch-free: bad options are reported before torch loads
                validated = cls.model_validate(flags)
            except ValidationError as e:
                raise TrainInputError(f"options: {describe_validation_error(e)}") from None
        go = getattr(importlib.import_module(module), function)
        if resume is not None:
            go(validated, resume, progress=not quiet, resume=True)
        else:
            go(validated, output, progress=not quiet)

    _report_errors(work)


def _options_command(name: str, cls: type[BaseModel], module: str, function: str, doc: str) -> None:
    """Register ``sflllm NAME``: one option per field of ``cls`` (declared once, there), then --output,
    --resume and --quiet; the command validates them and calls ``module.function``."""

    def command(**options: Any) -> None:
        _launch(cls, module, function, options)

    command.__doc__ = doc
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*(_field_option(field, info) for field, info in cls.model_fields.items()),
         *(inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, info])
           for option, (kind, info) in _COMMON_OPTIONS.items())]
    )
    app.command(name)(command)


_options_command("run", RunOptions, "sflllm.experiments.closed_loop", "run_closed_loop", """\
Optimise the network for the trained model, train with the choice and every baseline's, compare time to accuracy.

Writes report.md, metrics.json, curves.csv and PNGs (held-out loss against simulated wall-clock time).
With no options: offline, on the built-in tiny model, synthetic data and the demo scenario.
""")
_options_command("calibrate", CalibrateOptions, "sflllm.experiments.calibrate", "run_calibrate", """\
Measure E(r), the rounds each LoRA rank needs to reach a target held-out loss.

Writes rounds_per_rank.yaml (a scenario fragment; `sflllm run --calibration DIR` uses it), curves.csv and a PNG.
""")
