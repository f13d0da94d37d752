"""Thin command-line layer: parse options, hand them to ``sflllm.experiments``.

Implementations are imported inside each command so that ``sflllm optimize`` never imports torch,
and ``sflllm train`` checks its options, config file and output folder before torch loads.
The options of ``sflllm train`` are derived from ``TrainConfig``: each field's name, type, default
and description are declared once, there.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from sflllm.experiments.config import TrainConfig

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


def _train_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The ``--name`` option of one TrainConfig field: its type, help and default come from the field.

    Every option defaults to None (not given), so that only the flags a user passes override the
    ``--config`` file; the help shows the field's own default.
    """
    annotation = field.annotation
    flag = (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")
    if annotation in (bool, bool | None):
        flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
        kind: type = bool
    else:  # Literal choices, "auto" and comma-separated lists are strings; pydantic checks them
        kind = next((t for t in (int, float) if annotation in (t, t | None)), str)
    help_text, default = field.description or "", field.default
    if default is None and "; None: " in help_text:
        help_text, default = help_text.split("; None: ", 1)
    shown = str(default).lower() if isinstance(default, bool) else str(default)
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
    if quiet:  # also the weight-loading and download bars of transformers / huggingface_hub (process-wide)
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
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
    [_CONFIG_OPTION, *(_train_option(name, field) for name, field in TrainConfig.model_fields.items()), *_run_options()]
)
app.command()(train)


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
