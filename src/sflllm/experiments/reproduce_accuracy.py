"""``sflllm reproduce --accuracy``: SFL against centralized, FL and SL on a real pretrained model.

Each mode is one ordinary training run (:func:`sflllm.experiments.train.run_train`) with the same
:class:`~sflllm.experiments.config.TrainConfig` except ``mode``, written to ``accuracy/<mode>/``;
the table reads their ``metrics.json`` finals (held-out loss, perplexity, and the BLEU and ROUGE-L
that the training run's generation scoring reports). Importing this module does not import torch:
the training code is imported when a run starts.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sflllm.experiments.config import TrainConfig, TrainInputError, resolve_config

MODES = ("sfl", "centralized", "fl", "sl")
SHARED_DATA = Path("../shared/data")  # relative to the current folder, as in the README's examples
STORIES260K = Path("models/stories260K/hf")
E2E_TRAIN = Path("e2e/devset.csv")
E2E_TEST = Path("e2e/testset_w_refs.csv")
ACCURACY_DIR = "accuracy"
ACCURACY_TABLE = "accuracy.md"
ACCURACY_CSV = "accuracy.csv"


@dataclass(frozen=True)
class AccuracySettings:
    """The shared budget of the four runs: modest, a few rounds (``K I b`` samples per round).

    The defaults suit stories260K on E2E: the learning rate and batch of the real-learning test
    (tests/test_sfl_learning.py) at fewer rounds, and s = 192 tokens, which holds prompt and
    reference whole for 99% of the E2E test set (its tokenizer has 512 tokens; s = 144 cut 70% of
    the references).
    """

    model: str
    data: str
    eval_data: str | None
    rounds: int = 4
    clients: int = 3
    split_layer: int | None = None  # None: the middle block, L // 2
    rank: int = 8
    local_steps: int = 5
    batch_size: int = 8
    seq_len: int = 192
    lr: float = 2e-2
    eval_samples: int = 200
    generate_samples: int = 20
    seed: int = 0


def resolve_sources(model: str | None, data: str | None, eval_data: str | None,
                    shared: Path = SHARED_DATA) -> tuple[str, str, str | None]:
    """(model, data, eval_data): the user's ``--model/--data[/--eval-data]``, else stories260K on E2E in
    ``shared`` when it is there; anything else is a one-line error naming the missing option."""
    if model is None and data is None and eval_data is None:
        paths = [shared / STORIES260K, shared / E2E_TRAIN, shared / E2E_TEST]
        if all(path.exists() for path in paths):
            return str(paths[0]), str(paths[1]), str(paths[2])
        missing = next(path for path in paths if not path.exists())
        raise TrainInputError(f"--accuracy needs --model and --data (the default, stories260K on E2E, "
                              f"was not found: no {missing})")
    if model is None or data is None:
        raise TrainInputError(f"--accuracy: give {'--model' if model is None else '--data'} too "
                              "(or neither, for stories260K on E2E from ../shared/data)")
    return model, data, eval_data


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """No weight-loading progress bars from transformers (restored afterwards)."""
    import transformers.utils.logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def check_data_files(*sources: str | None) -> None:
    """A ``--data``/``--eval-data`` that names a local file (.csv, .jsonl) must exist: checked before any work."""
    for option, source in zip(("--data", "--eval-data"), sources):
        if source is not None and Path(source).suffix in {".csv", ".jsonl"} and not Path(source).is_file():
            raise TrainInputError(f"{option}: file not found: {source}")


def middle_split_layer(model: str) -> int:
    """L // 2 for the model's L blocks. Loading it also checks it before any work (errors name it)."""
    from sflllm.model import load_pretrained

    try:
        with no_loading_bars():
            loaded, _ = load_pretrained(model)
    except (ValueError, OSError) as exc:
        raise TrainInputError(f"--model: {' '.join(str(exc).split())}") from None
    return max(1, int(loaded.config.num_hidden_layers) // 2)


def accuracy_configs(settings: AccuracySettings) -> dict[str, TrainConfig]:
    """One validated TrainConfig per mode; they differ only in ``mode``. The model is loaded once to check it."""
    check_data_files(settings.data, settings.eval_data)
    split_layer = settings.split_layer if settings.split_layer is not None else middle_split_layer(settings.model)
    fields = dict(model=settings.model, data=settings.data, eval_data=settings.eval_data, rounds=settings.rounds,
                  clients=settings.clients, split_layer=split_layer, rank=settings.rank,
                  local_steps=settings.local_steps, batch_size=settings.batch_size, seq_len=settings.seq_len,
                  lr=settings.lr, eval_samples=settings.eval_samples, generate=True,
                  generate_samples=settings.generate_samples, seed=settings.seed)
    return {mode: resolve_config({}, {**fields, "mode": mode}, source="--accuracy") for mode in MODES}


def run_accuracy(configs: dict[str, TrainConfig], folder: Path, *,
                 report: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train every mode into ``folder/<mode>``; one table row per mode from its final metrics.

    The runs print nothing (their folder is not yet the output; no weight-loading bars either);
    ``report`` gets one line per mode, and each warning they raise once, as one line.
    """
    from rich.console import Console

    from sflllm.experiments.train import run_train

    rows, seen = [], set()
    with no_loading_bars():
        for mode, config in configs.items():
            if report is not None:
                report(f"accuracy: training {mode} ({config.rounds} rounds) ...")
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = run_train(config, folder / mode, console=Console(quiet=True), progress=False)
            for warning in caught:  # library deprecations are not the user's business
                message = f"warning: {warning.message}"
                if not issubclass(warning.category, (FutureWarning, DeprecationWarning)) and message not in seen:
                    seen.add(message)
                    if report is not None:
                        report(message)
            final, generation = result.metrics["final"], result.metrics["final"]["generation"]
            row = {"mode": mode, "heldout_loss": final["heldout_loss"], "perplexity": final["perplexity"],
                   "bleu": generation["bleu"], "rouge_l": generation["rouge_l"],
                   "initial_heldout_loss": result.metrics["initial"]["heldout_loss"],
                   "train_wall_s": sum(r["wall_time_s"] for r in result.metrics["rounds"]),
                   "run_wall_s": time.perf_counter() - start}
            rows.append(row)
            if report is not None:
                report(f"accuracy: {mode}: held-out loss {row['initial_heldout_loss']:.4f} -> "
                       f"{row['heldout_loss']:.4f}, BLEU {row['bleu']:.2f}, ROUGE-L {row['rouge_l']:.2f} "
                       f"({row['run_wall_s']:.0f} s)")
    return rows


def settings_line(config: TrainConfig) -> str:
    """The shared settings of the runs, in the paper's vocabulary."""
    return (f"model `{config.model}`; train `{config.data}`; held out `{config.eval_data or 'held-out MRs of the data'}` "
            f"({config.eval_samples} examples for the loss, {config.generate_samples} MRs generated, greedy, "
            f"at most {config.max_new_tokens} new tokens); K = {config.clients} clients, split layer "
            f"l = {config.split_layer}, LoRA rank r = {config.rank}, alpha {config.lora_alpha:g}, "
            f"I = {config.local_steps} local steps, b = {config.batch_size}, s = {config.seq_len}, "
            f"lr {config.lr:g} (AdamW), {config.rounds} rounds ({config.clients * config.local_steps * config.batch_size} "
            f"samples per round in every mode), seed {config.seed}")


def accuracy_markdown(rows: Sequence[dict[str, Any]], config: TrainConfig) -> str:
    """``accuracy.md``: the table, the settings and where each run is."""
    lines = [
        "# Accuracy: SFL against centralized, FL and SL",
        "",
        f"Settings: {settings_line(config)}. Held-out loss is the token-weighted cross-entropy (nats per "
        "token) after the last round; perplexity = exp(loss); BLEU and ROUGE-L (x100) as the training run scores "
        "them (the official E2E scorer's definitions, `sflllm.metrics`). Training wall time: the rounds only; whole run: with loading, "
        "evaluation and generation. Before training, the held-out loss was "
        f"{rows[0]['initial_heldout_loss']:.4f}. At a budget this small, BLEU and ROUGE-L over "
        f"{config.generate_samples} MRs are noisy; the held-out loss over {config.eval_samples} examples is the "
        "steadier comparison (more rounds: `--accuracy-rounds`).",
        "",
        "| mode | held-out loss | perplexity | BLEU | ROUGE-L | training wall time (s) | whole run (s) | run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['heldout_loss']:.4f} | {row['perplexity']:.3f} | {row['bleu']:.2f} | "
                     f"{row['rouge_l']:.2f} | {row['train_wall_s']:.1f} | {row['run_wall_s']:.1f} | "
                     f"`{ACCURACY_DIR}/{row['mode']}/` |")
    return "\n".join(lines) + "\n"

