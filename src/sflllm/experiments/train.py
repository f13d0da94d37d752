"""One training run: validate everything, then train round by round, checkpointing every round.

Layout of the output directory ``DIR`` (every file written atomically, nothing pickled)::

    DIR/config.yaml                 the resolved TrainConfig (YAML 1.2)
    DIR/metrics.json                per round: train loss, held-out loss, wall time of the round's training
                                    (local iterations + aggregation); final held-out loss, perplexity,
                                    generation metrics
    DIR/client_adapter.safetensors  global (FedAvg'd) client adapter: LoRA tensors of blocks 1..split_layer
    DIR/server_adapter.safetensors  server adapter: LoRA tensors of blocks split_layer+1..L
    DIR/state.safetensors           resume state: Federation.state_dict() (adapters, optimizer states,
                                    data cursors, RNG) + metadata (rounds done, config, metrics so far)
    DIR/generations.jsonl           with ``generate``: the merged model's sentence for each held-out MR

Bad input raises ``TrainInputError`` before ``DIR`` is created (or, on resume, before anything in
it is rewritten).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sflllm import __version__
from sflllm.data import (
    Example,
    TokenizedExamples,
    build_demo_tokenizer,
    load_examples,
    partition,
    prompt_ids,
    synthetic_examples,
    tokenize,
)
from sflllm.experiments.checkpoint import (
    check_same_tensors,
    read_safetensors,
    write_atomic,
    write_json_atomic,
    write_safetensors_atomic,
)
from sflllm.experiments.config import (
    RESUMABLE_FIELDS,
    TrainConfig,
    TrainInputError,
    config_to_yaml,
    read_config_file,
    resolve_config,
)
from sflllm.model import (
    SplitModel,
    attach_lora,
    build_demo_model,
    lm_loss_sum,
    load_pretrained,
    lora_parameters,
    max_positions,
    model_device,
    resolve_device,
    resolve_dtype,
    split_model,
)
from sflllm.sfl import Federation, Hyper, make_federation

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
STATE_FILE = "state.safetensors"
CLIENT_ADAPTER_FILE = "client_adapter.safetensors"
SERVER_ADAPTER_FILE = "server_adapter.safetensors"
GENERATIONS_FILE = "generations.jsonl"
METRICS_SCHEMA = "sflllm.train.metrics/1"

DEMO_TRAIN_EXAMPLES = 384  # synthetic training pool of the offline demo (before train_samples)
HELDOUT_MR_FRACTION = 0.1  # share of distinct MRs held out when no eval_data is given
REAL_RUN_HINT = (
    "for a real model run e.g. `sflllm train --model gpt2 --data tuetschek/e2e_nlg --eval-data tuetschek/e2e_nlg:test --lr 1e-3` "
    "(online) or `sflllm train --model ../shared/data/models/stories260K/hf --data ../shared/data/e2e/devset.csv "
    "--eval-data ../shared/data/e2e/testset_w_refs.csv --seq-len 192 --lr 5e-3 --generate`"
)


@dataclass(frozen=True)
class TrainResult:
    """Where a run wrote its files, and the metrics it wrote to ``metrics.json``."""

    output_dir: Path
    metrics: dict[str, Any]


@dataclass
class _Run:
    """Everything validated and loaded, before any file is written."""

    config: TrainConfig
    split: SplitModel
    tokenizer: PreTrainedTokenizerBase
    federation: Federation
    device: torch.device
    eval_tokens: TokenizedExamples
    generation_examples: list[Example]  # every reference of the first generate_samples held-out MRs


# --------------------------------------------------------------------------- preparation (no writes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def placement(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    """The device (``auto`` resolved) and base dtype the run trains in; TrainInputError naming the field."""
    try:
        device = resolve_device(config.device)
    except ValueError as e:
        raise TrainInputError(f"device: {_one_line(e)}") from None
    return device, resolve_dtype(config.dtype)


def load_model_and_tokenizer(config: TrainConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base causal LM and its tokenizer: the built-in demo pair, or ``config.model`` (hub name or dir).

    The model is in float32 on the CPU; :func:`prepare` moves it to the run's device and dtype.
    """
    if config.model is None:
        tokenizer = build_demo_tokenizer()
        model = build_demo_model(
            len(tokenizer),
            config.seed,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return model, tokenizer
    try:
        return load_pretrained(config.model)
    except (ValueError, OSError) as e:
        raise TrainInputError(_naming(_one_line(e), "model", config.model)) from None


def _load(source: str, field: str) -> list[Example]:
    try:
        examples = load_examples(source)
    except (ValueError, OSError) as e:
        raise TrainInputError(_naming(_one_line(e), field, source)) from None
    if not examples:
        raise TrainInputError(f"{field} {source!r} holds no examples")
    return examples


def split_heldout_mrs(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split by distinct MR (all references of one MR on the same side): (train, held-out).

    At least one MR goes to each side when there are two or more MRs.
    """
    mrs = sorted({e.mr for e in examples})
    if len(mrs) < 2:
        raise TrainInputError("data has fewer than 2 distinct MRs: cannot hold some out; pass --eval-data")
    order = np.random.default_rng(seed).permutation(len(mrs))
    n_held = min(max(1, round(fraction * len(mrs))), len(mrs) - 1)
    held = {mrs[i] for i in order[:n_held]}
    return [e for e in examples if e.mr not in held], [e for e in examples if e.mr in held]


def load_train_eval_examples(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Training pool and held-out pool: ``data`` (synthetic without it) and ``eval_data`` (without it,
    held-out MRs of the training pool)."""
    n_demo = config.train_samples or DEMO_TRAIN_EXAMPLES
    if config.data is not None:
        train = _load(config.data, "data")
        if config.eval_data is None:
            train, held = split_heldout_mrs(train, HELDOUT_MR_FRACTION, config.seed)
        else:
            held = _load(config.eval_data, "eval_data")
    elif config.eval_data is not None:  # synthetic training data, the user's held-out set
        train, held = synthetic_examples(n_demo, config.seed), _load(config.eval_data, "eval_data")
    else:
        pool = synthetic_examples(n_demo + config.eval_samples * 2, config.seed)
        train, held = split_heldout_mrs(pool, HELDOUT_MR_FRACTION * 2, config.seed)
    if config.train_samples is not None and len(train) > config.train_samples:
        keep = np.sort(np.random.default_rng(config.seed).choice(len(train), config.train_samples, replace=False))
        train = [train[i] for i in keep]
    return train, held


def select_eval_examples(held: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A seeded subset of ``n`` held-out examples (all of them if fewer), in pool order."""
    if len(held) <= n:
        return list(held)
    keep = np.sort(np.random.default_rng(seed + 1).choice(len(held), n, replace=False))
    return [held[i] for i in keep]


def first_mrs(examples: Sequence[Example], n: int) -> list[Example]:
    """Every example of the first ``n`` distinct MRs (in first-appearance order)."""
    keep: set[str] = set()
    for e in examples:
        if len(keep) == n:
            break
        keep.add(e.mr)
    return [e for e in examples if e.mr in keep]


def partition_clients(train: Sequence[Example], config: TrainConfig) -> list[np.ndarray]:
    """Row indices of each client's local data (``partition`` gives every client at least one example)."""
    if len(train) < config.clients:
        raise TrainInputError(
            f"clients: {config.clients} clients but only {len(train)} training examples; use fewer clients or more data"
        )
    try:
        parts = partition(
            list(train),
            config.clients,
            scheme=config.partition,
            alpha=config.dirichlet_alpha,
            attribute=config.partition_attribute,
            seed=config.seed,
            keep_mr_together=config.keep_mr_together,
        )
    except ValueError as e:
        raise TrainInputError(f"partition: {_one_line(e)}") from None
    return parts


def prepare(config: TrainConfig) -> _Run:
    """Load and validate model, data, partition and the federation. Writes nothing."""
    seed_everything(config.seed)
    device, dtype = placement(config)
    model, tokenizer = load_model_and_tokenizer(config)
    # the frozen base in the run's dtype on its device; attach_lora keeps the LoRA tensors in float32
    model = model.to(device=device, dtype=dtype)
    train, held = load_train_eval_examples(config)
    parts = partition_clients(train, config)
    eval_examples = select_eval_examples(held, config.eval_samples, config.seed)

    generation_examples = first_mrs(held, config.generate_samples) if config.generate else []
    positions = max_positions(model)
    if positions is not None and config.seq_len > positions:
        raise TrainInputError(f"seq_len: {config.seq_len} exceeds the model's {positions} positions")
    if positions is not None and generation_examples:
        longest = max(len(p) for p in prompt_ids(tokenizer, sorted({e.mr for e in generation_examples})))
        if longest + config.max_new_tokens > positions:
            raise TrainInputError(
                f"max_new_tokens: longest prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) "
                f"exceeds the model's {positions} positions"
            )
    try:
        peft_model = attach_lora(
            model, config.rank, config.lora_alpha, config.lora_dropout, config.lora_targets, seed=config.seed
        )
    except ValueError as e:
        raise TrainInputError(f"lora_targets: {_one_line(e)}") from None
    try:
        split = split_model(peft_model, config.split_layer)
    except ValueError as e:
        raise TrainInputError(f"split_layer: {_one_line(e)}") from None

    try:
        train_tokens = tokenize(train, tokenizer, config.seq_len)
        eval_tokens = tokenize(eval_examples, tokenizer, config.seq_len)
    except ValueError as e:
        raise TrainInputError(f"seq_len: {_one_line(e)}") from None
    client_data = [train_tokens.select(idx) for idx in parts]
    hyper = Hyper(
        mode=config.mode,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        server_adapter=config.server_adapter,
        client_batching=config.client_batching,
        server_chunk=config.server_chunk,
    )
    try:
        federation = make_federation(split, client_data, hyper)
    except ValueError as e:
        raise TrainInputError(_one_line(e)) from None
    return _Run(config, split, tokenizer, federation, device, eval_tokens, generation_examples)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: TokenizedExamples, batch_size: int) -> float:
    """Token-weighted mean next-token cross-entropy of ``model`` on ``tokens`` (dropout off)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    try:
        for start in range(0, len(tokens.input_ids), batch_size):
            ids, mask, labels = (t[start : start + batch_size].to(device)
                                 for t in (tokens.input_ids, tokens.attention_mask, tokens.labels))
            batch_sum, batch_count = lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
            total += float(batch_sum)
            count += int(batch_count)
    finally:
        model.train(was_training)
    return total / count  # count > 0: tokenize leaves every row at least one target token


# --------------------------------------------------------------------------- adapters and checkpoints


def split_adapters(split: SplitModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(client adapter, server adapter): the LoRA tensors of ``split.full`` by which part holds them."""
    client_ids = {id(p) for p in split.client.parameters()}
    client, server = {}, {}
    for name, p in lora_parameters(split.full).items():
        (client if id(p) in client_ids else server)[name] = p.detach().clone()
    return client, server


def _trajectory(config: TrainConfig) -> dict[str, Any]:
    """The config fields that determine adapters and per-round metrics (must match on resume)."""
    return config.model_dump(mode="json", exclude=set(RESUMABLE_FIELDS))


def _save_round(out: Path, run: _Run, metrics: dict[str, Any]) -> None:
    client, server = split_adapters(run.split)
    meta = {"sflllm_version": __version__, "split_layer": str(run.config.split_layer)}
    write_safetensors_atomic(out / CLIENT_ADAPTER_FILE, client, meta)
    write_safetensors_atomic(out / SERVER_ADAPTER_FILE, server, meta)
    write_safetensors_atomic(
        out / STATE_FILE,
        run.federation.state_dict(),
        {
            "sflllm_version": __version__,
            "rounds_completed": str(len(metrics["rounds"])),
            "trajectory_config": json.dumps(_trajectory(run.config), sort_keys=True),
            "metrics": json.dumps(metrics),
        },
    )
    write_json_atomic(out / METRICS_FILE, metrics)


def _load_resume_state(out: Path, run: _Run) -> dict[str, Any]:
    """Validate every checkpoint in ``out`` against ``run`` and load the federation state; the metrics so far."""
    state_path = out / STATE_FILE
    tensors, meta = read_safetensors(state_path)
    try:
        saved_trajectory = json.loads(meta["trajectory_config"])
        metrics = json.loads(meta["metrics"])
        rounds_completed = int(meta["rounds_completed"])
    except (KeyError, ValueError) as e:
        raise TrainInputError(f"checkpoint {state_path} is corrupted: bad metadata ({_one_line(e)})") from None
    now = _trajectory(run.config)
    diff = sorted(k for k in now.keys() | saved_trajectory.keys() if now.get(k) != saved_trajectory.get(k))
    if diff:
        k = diff[0]
        raise TrainInputError(
            f"config mismatch: {out / CONFIG_FILE} has {k}={now.get(k)!r} but {state_path} was written with "
            f"{k}={saved_trajectory.get(k)!r} (differing fields: {', '.join(diff)})"
        )
    if rounds_completed != len(metrics.get("rounds", [])):
        raise TrainInputError(f"checkpoint {state_path} is corrupted: round count and metrics disagree")
    check_same_tensors(state_path, tensors, run.federation.state_dict())
    client_ref, server_ref = split_adapters(run.split)
    for name, ref in ((CLIENT_ADAPTER_FILE, client_ref), (SERVER_ADAPTER_FILE, server_ref)):
        check_same_tensors(out / name, read_safetensors(out / name)[0], ref)
    try:
        run.federation.load_state_dict(tensors)
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainInputError(f"checkpoint {state_path} does not match this run: {_one_line(e)}") from None
    run.federation.load_global_adapter()
    return metrics


# --------------------------------------------------------------------------- the run


SMALL_HIDDEN_SIZE = 256  # models this narrow (the demo's 128, stories260K's 64) train on one thread


def intra_op_threads(config: TrainConfig, model: PreTrainedModel) -> int | None:
    """``config.threads``, else 1 for narrow models (hidden size <= 256), else None (torch's default).

    Narrow matrices gain nothing from a second intra-op thread, and on 2 shared cores two threads
    made such runs 2-10x slower (measured: offline demo; stories260K 4-5 s vs 16-38 s per round of
    120 samples; bench_sfl_speed d=256 55 vs 380 ms/sample median), while a GPT-2-small-wide model
    (d=768) ran 1.6x faster on two.
    """
    if config.threads is not None:
        return config.threads
    return 1 if int(model.config.hidden_size) <= SMALL_HIDDEN_SIZE else None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads (restored afterwards); None leaves torch's setting."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_output_dir() -> Path:
    """``runs/<YYYYmmdd-HHMMSS>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _initial_metrics(run: _Run) -> dict[str, Any]:
    """``metrics.json`` before the first round: the held-out loss of the untrained adapters."""
    return {
        "schema": METRICS_SCHEMA,
        "demo": run.config.is_demo,
        "mode": run.config.mode,
        "initial": {"heldout_loss": heldout_loss(run.split.full, run.eval_tokens, run.config.batch_size)},
        "rounds": [],
        "final": None,
    }


def run_train(
    config: TrainConfig,
    output_dir: Path | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train from scratch into ``output_dir`` (default :func:`default_output_dir`; must not exist or be empty).

    Returns the output dir and the metrics written to ``metrics.json``.
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainInputError(
            f"output {out} already exists and is not empty; continue it with --resume {out} or choose another --output"
        )
    run = prepare(config)
    with torch_threads(intra_op_threads(config, run.split.full)):
        metrics = _initial_metrics(run)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / CONFIG_FILE, config_to_yaml(config).encode("utf-8"))
        return _train_rounds(out, run, metrics, console or Console(soft_wrap=True), progress)


def resume_train(
    output_dir: Path, overrides: dict[str, Any] | None = None, *, console: Console | None = None, progress: bool = True
) -> TrainResult:
    """Continue the run in ``output_dir`` (e.g. with a larger ``rounds``) to the same result as an uninterrupted run.

    Only fields in ``RESUMABLE_FIELDS`` may be overridden. Every checkpoint is validated before any
    file in ``output_dir`` is rewritten. A run stopped before its first checkpoint (``DIR`` holds only
    ``config.yaml``) starts again from round 1.
    """
    out = Path(output_dir)
    # a run stopped during its first round has written only config.yaml: resuming starts it afresh
    first_round = out.is_dir() and [p.name for p in out.iterdir()] == [CONFIG_FILE]
    if not first_round and not (out / STATE_FILE).is_file():
        raise TrainInputError(f"resume: {out / STATE_FILE} not found; is {out} the output of `sflllm train`?")
    saved = read_config_file(out / CONFIG_FILE)
    saved_config = resolve_config(saved, {}, source=str(out / CONFIG_FILE))
    overrides = dict(overrides or {})
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_FIELDS and getattr(saved_config, k, v) != v)
    if changed:
        raise TrainInputError(
            f"resume: {', '.join(changed)} cannot change when resuming {out} "
            f"(only {', '.join(sorted(RESUMABLE_FIELDS))} can)"
        )
    config = resolve_config(saved, overrides, source=f"resume {out}")
    run = prepare(config)
    with torch_threads(intra_op_threads(config, run.split.full)):
        metrics = _initial_metrics(run) if first_round else _load_resume_state(out, run)
        metrics["final"] = None
        done = len(metrics["rounds"])
        if done >= config.rounds:
            raise TrainInputError(f"resume: {out} already has {done} rounds; pass --rounds greater than {done}")
        write_atomic(out / CONFIG_FILE, config_to_yaml(config).encode("utf-8"))
        return _train_rounds(out, run, metrics, console or Console(soft_wrap=True), progress)


def _train_rounds(out: Path, run: _Run, metrics: dict[str, Any], console: Console, show: bool) -> TrainResult:
    config = run.config
    if config.is_demo:
        console.print(f"[bold yellow]demo:[/] {_demo_what(config)}; {REAL_RUN_HINT}", highlight=False)
    console.print(
        f"training {config.mode} on {run.device}{' (auto)' if config.device == 'auto' else ''} in {config.dtype} "
        f"| K={config.clients} clients, split_layer={config.split_layer}, rank={config.rank}, "
        f"local_steps={config.local_steps}, rounds={config.rounds} | held-out loss before training "
        f"{metrics['initial']['heldout_loss']:.4f}",
        highlight=False,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not show) as bar:
        for r in range(len(metrics["rounds"]), config.rounds):
            task = bar.add_task(f"round {r + 1}/{config.rounds}", total=config.local_steps)
            start = time.perf_counter()
            stats = run.federation.run_round(
                r, progress=lambda done, total, task=task: bar.update(task, completed=done, total=total)
            )
            wall = time.perf_counter() - start
            bar.remove_task(task)
            run.federation.load_global_adapter()
            record = {
                "round": r + 1,
                "train_loss": float(stats["train_loss"]),
                "heldout_loss": heldout_loss(run.split.full, run.eval_tokens, config.batch_size),
                "samples": int(stats["samples"]),
                "wall_time_s": wall,
            }
            metrics["rounds"].append(record)
            _save_round(out, run, metrics)
            console.print(
                f"round {r + 1}/{config.rounds}: train loss {record['train_loss']:.4f}, "
                f"held-out loss {record['heldout_loss']:.4f}, {wall:.2f} s",
                highlight=False,
            )
    metrics["final"] = _final_metrics(run, metrics, out)
    write_json_atomic(out / METRICS_FILE, metrics)
    final = metrics["final"]
    console.print(
        f"final held-out loss {final['heldout_loss']:.4f} (perplexity {final['perplexity']:.2f}), "
        f"from {metrics['initial']['heldout_loss']:.4f} before training",
        highlight=False,
    )
    if final["generation"] is not None:
        console.print(
            "generation: "
            + ", ".join(f"{k} {v:.4g}" for k, v in final["generation"].items() if isinstance(v, float)),
            highlight=False,
        )
    console.print(f"results in {out}/ ({METRICS_FILE}, {CONFIG_FILE}, *.safetensors)", highlight=False, markup=False)
    return TrainResult(out, metrics)


def _final_metrics(run: _Run, metrics: dict[str, Any], out: Path) -> dict[str, Any]:
    """Held-out loss and perplexity of the merged (global client + server) model; generation scores if asked."""
    loss = metrics["rounds"][-1]["heldout_loss"]
    generation = generation_metrics(run, out) if run.config.generate else None
    return {"heldout_loss": loss, "perplexity": math.exp(loss), "generation": generation}


def generation_metrics(run: _Run, out: Path) -> dict[str, Any]:
    """E2E metrics of the merged model's generations for the held-out MRs; writes DIR/generations.jsonl."""
    from sflllm.experiments.evaluation import evaluate_generation  # nltk & co. cost ~1 s to import: only if asked

    scores, mrs, hypotheses = evaluate_generation(
        run.split.full,
        run.tokenizer,
        run.generation_examples,
        num_beams=run.config.num_beams,
        max_new_tokens=run.config.max_new_tokens,
    )
    lines = (json.dumps({"mr": mr, "generation": hyp}, ensure_ascii=False) + "\n" for mr, hyp in zip(mrs, hypotheses))
    write_atomic(out / GENERATIONS_FILE, "".join(lines).encode("utf-8"))
    return scores


def _demo_what(config: TrainConfig) -> str:
    parts = []
    if config.model is None:
        parts.append("built-in tiny GPT-2 (random init)")
    if config.data is None:
        parts.append("synthetic E2E-style data")
    return " + ".join(parts)


def _naming(message: str, field: str, value: str) -> str:
    """``message`` prefixed so that it names both the option ``field`` and its ``value`` once."""
    if value not in message:
        return f"{field} {value!r}: {message}"
    return message if message.startswith(field) else f"{field}: {message}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
