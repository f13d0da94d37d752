"""Thin command-line layer: parse options, hand them to ``sflllm.experiments``.

Implementations are imported inside each command so that ``sflllm optimize`` never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Split federated LoRA fine-tuning of LLMs, and the joint resource-allocation optimiser.",
)

# `sflllm train` is defined in this file by the SFL-engine work; `sflllm optimize` by the optimiser work.


@app.callback()
def main() -> None:
    """sflllm: split federated LoRA fine-tuning over communication networks."""


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", help="YAML 1.2 file of TrainConfig fields; flags override it.")] = None,
    model: Annotated[str | None, typer.Option(help="HF model name or local dir (default: built-in tiny demo model).")] = None,
    data: Annotated[str | None, typer.Option(help="Training data: .csv (mr,ref), .jsonl or hub dataset (default: synthetic E2E-style).")] = None,
    eval_data: Annotated[str | None, typer.Option(help="Held-out data (default: held-out MRs of --data).")] = None,
    train_samples: Annotated[int | None, typer.Option(help="Use at most this many training examples.")] = None,
    mode: Annotated[str | None, typer.Option(help="sfl | centralized | fl | sl.")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of clients K.")] = None,
    split_layer: Annotated[int | None, typer.Option(help="Blocks 1..split_layer run on the clients.")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank r.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha.")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout.")] = None,
    lora_targets: Annotated[str | None, typer.Option(help="Comma-separated LoRA target modules (default: per model type).")] = None,
    server_adapter: Annotated[str | None, typer.Option(help="shared | per_client.")] = None,
    local_steps: Annotated[int | None, typer.Option(help="Local iterations I per round.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Training rounds (with --resume: the new total).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Mini-batch size b per client.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Sequence length s in tokens.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of everything.")] = None,
    partition: Annotated[str | None, typer.Option(help="iid | dirichlet.")] = None,
    dirichlet_alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration (smaller: more skew).")] = None,
    partition_attribute: Annotated[str | None, typer.Option(help="MR slot the Dirichlet partition skews on.")] = None,
    keep_mr_together: Annotated[bool | None, typer.Option("--keep-mr-together/--split-mrs", help="Keep all references of one MR on one client (default) or split them.")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Held-out examples for the held-out loss.")] = None,
    generate: Annotated[bool | None, typer.Option("--generate/--no-generate", help="Generate for held-out MRs and score BLEU/ROUGE-L/NIST/...")] = None,
    generate_samples: Annotated[int | None, typer.Option(help="Distinct held-out MRs to generate for.")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beams for generation.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest generation in tokens.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (default: 1 for models of hidden size <= 256, else torch's default).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N | mps (default auto: CUDA, then MPS, then CPU).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16: the frozen base weights and cut tensors (LoRA and AdamW stay float32).")] = None,
    client_batching: Annotated[str | None, typer.Option(help="auto | sequential | batched: the K client passes one by one or as one batched pass.")] = None,
    server_chunk: Annotated[int | None, typer.Option(help="Main server runs N clients' activations at a time (bounds its memory; default all K).")] = None,
    output: Annotated[Path | None, typer.Option(help="Output dir (default: runs/<timestamp>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this output dir (e.g. with a larger --rounds).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Fine-tune with split federated LoRA; writes metrics.json, config.yaml and safetensors checkpoints.

    Without --model and --data this runs an offline demo (tiny built-in model, synthetic data).
    """
    flags = {k: v for k, v in locals().items() if k not in _NOT_CONFIG_FIELDS and v is not None}
    import warnings

    from rich.console import Console

    from sflllm.experiments.config import TrainInputError, read_config_file, resolve_config

    if lora_targets is not None:
        flags["lora_targets"] = [t.strip() for t in lora_targets.split(",") if t.strip()]
    if quiet:  # also the weight-loading and download bars of transformers / huggingface_hub (process-wide)
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: err.print(f"warning: {message}", markup=False)
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations peft triggers
        try:
            if resume is not None:
                if config is not None or output is not None:
                    raise TrainInputError("--resume continues the run in DIR with its config.yaml; drop --config/--output")
                from sflllm.experiments.train import resume_train

                resume_train(resume, flags, progress=not quiet)
            else:
                from sflllm.experiments.train import run_train

                file_values = read_config_file(config) if config is not None else {}
                cfg = resolve_config(file_values, flags, source=str(config) if config else "options")
                run_train(cfg, output, progress=not quiet)
        except TrainInputError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(code=2) from None


_NOT_CONFIG_FIELDS = frozenset({"config", "output", "resume", "quiet", "lora_targets"})


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

    # The optimiser's arrays are tiny (K x M): BLAS threads only cost start-up CPU (set before numpy loads).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from sflllm.experiments.optimize import OptimizeInputError, print_run, run_optimize

    try:
        run = run_optimize(scenario, method=method, plot_dir=plot, save_realised=save_realised)
    except OptimizeInputError as e:
        from rich.console import Console

        Console(stderr=True).print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    print_run(run, as_json=as_json)
