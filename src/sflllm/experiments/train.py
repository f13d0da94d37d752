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
    DIR/generation.hyp.txt          with ``generate``: the merged model's sentence for each held-out MR,
    DIR/generation.ref.txt          the references of each MR and the MRs, one per line, in the official
    DIR/generation.mr.txt           E2E scorer's format (``sflllm score --hyp ... --ref ...`` rescores them)

Bad input raises ``TrainInputError`` before ``DIR`` is created (or, on resume, before anything in
it is rewritten).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sflllm import __version__
from sflllm.cost.profile import profile_from_config
from sflllm.data import (
    Example,
    TokenizedExamples,
    build_demo_tokenizer,
    load_examples,
    longest_example,
    partition,
    prompt_ids,
    synthetic_examples,
    tokenize,
)
from sflllm.experiments.checkpoint import (
    check_same_tensors,
    read_safetensors,
    write_json_atomic,
    write_safetensors_atomic,
)
from sflllm.experiments.config import (
    RESUME_OVERRIDES,
    TrainConfig,
    TrainInputError,
    config_to_yaml,
    read_config_file,
    resolve_config,
)
from sflllm.experiments.divergence import check_finite, diverged_message, unchanged
from sflllm.experiments.memory import available_memory, estimate_peak_memory, memory_advice
from sflllm.experiments.run_dir import (
    CONFIG_FILE,
    STATE_FILE,
    check_new_output_dir,
    check_resumable,
    default_output_dir,
)
from sflllm.files import MAX_ECHO_CHARS, ensure_output_dir, write_atomic
from sflllm.model import (
    SplitModel,
    attach_lora,
    build_demo_model,
    lm_loss_sum,
    load_pretrained,
    lora_parameters,
    max_positions,
    smallest_target_dimension,
    model_device,
    resolve_device,
    resolve_dtype,
    split_model,
)
from sflllm.sfl import ClientState, Federation, Hyper, RoundEngine, make_federation

METRICS_FILE = "metrics.json"
CLIENT_ADAPTER_FILE = "client_adapter.safetensors"
SERVER_ADAPTER_FILE = "server_adapter.safetensors"
HYPOTHESES_FILE = "generation.hyp.txt"
REFERENCES_FILE = "generation.ref.txt"
MRS_FILE = "generation.mr.txt"
METRICS_SCHEMA = "sflllm.train.metrics/1"

DEMO_TRAIN_EXAMPLES = 384  # synthetic training pool of the offline demo (before train_samples)
HELDOUT_MR_FRACTION = 0.1  # share of distinct MRs held out when no eval_data is given
REAL_RUN_HINT = (  # the README's two examples, shortened
    "for a real model run e.g. `sflllm train --model gpt2 --data tuetschek/e2e_nlg:train "
    "--eval-data tuetschek/e2e_nlg:test --lr 2e-4` (online) or `sflllm train --model "
    "../shared/data/models/stories260K/hf --data ../shared/data/e2e/devset.csv "
    "--eval-data ../shared/data/e2e/testset_w_refs.csv --lr 5e-3 --generate`"
)


class TrainDiverged(TrainInputError):
    """Training produced a non-finite loss, adapter or AdamW state; the last good checkpoint is kept."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during the rounds (still a KeyboardInterrupt); the message says how to continue."""


@dataclass(frozen=True)
class TrainResult:
    """Where a run wrote its files, and the metrics it wrote to ``metrics.json``."""

    output_dir: Path
    metrics: dict[str, Any]


@dataclass
class _Run:
    """Everything validated and loaded, before any file is written."""

    config: TrainConfig
    seq_len: int  # config.seq_len, or the one "auto" chose
    split: SplitModel
    tokenizer: PreTrainedTokenizerBase
    federation: RoundEngine
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
    if config.engine != "local" and device.type != "cpu":
        # the flower-sim and dataplane engines decode every received tensor onto the CPU
        raise TrainInputError(f"engine: {config.engine!r} runs on the CPU only, not on {device}; "
                              "pass --device cpu or --engine local")
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


def resolve_seq_len(config: TrainConfig, train: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                    positions: int | None) -> int:
    """``config.seq_len``, or for ``auto`` the longest tokenised training example capped at the model's
    ``positions`` (longer examples are then truncated, with tokenize's warning)."""
    if config.seq_len != "auto":
        if positions is not None and config.seq_len > positions:
            raise TrainInputError(f"seq_len: {config.seq_len} exceeds the model's {positions} positions")
        return config.seq_len
    longest = longest_example(train, tokenizer)
    return max(4, min(longest, positions)) if positions is not None else longest


def check_sizes(config: TrainConfig, model: PreTrainedModel, seq_len: int, examples: int, force: bool) -> None:
    """Refuse a rank above the smallest LoRA target dimension, and (unless ``force``) a run whose
    peak memory estimate exceeds the available memory (:mod:`sflllm.experiments.memory`)."""
    try:
        name, size = smallest_target_dimension(model, config.lora_targets)
    except ValueError as e:
        raise TrainInputError(f"lora_targets: {_one_line(e)}") from None
    if config.rank > size:
        raise TrainInputError(f"rank: {config.rank} exceeds {size}, the smallest dimension of LoRA target {name}")
    if force:
        return
    try:
        profile = profile_from_config(model.config.to_dict(), config.lora_targets)
    except ValueError:
        return  # a family the cost model does not describe: no estimate
    estimate = estimate_peak_memory(
        model, profile, mode=config.mode, clients=config.clients, batch_size=config.batch_size,
        seq_len=seq_len, rank=config.rank, examples=examples,
    )
    advice = memory_advice(estimate, available_memory())
    if advice is not None:
        raise TrainInputError(advice)


def prepare(config: TrainConfig, *, force: bool = False, make_engine: MakeEngine | None = None) -> _Run:
    """Load and validate model, data, partition, sizes and the federation. Writes nothing.

    ``make_engine(config, federation)`` builds the round engine of ``engine: flower-deployment``
    (the ServerApp passes one: :mod:`sflllm.experiments.deployment`).
    """
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
    seq_len = resolve_seq_len(config, train, tokenizer, positions)
    check_sizes(config, model, seq_len, len(train) + len(eval_examples), force)
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
        raise TrainInputError(_field_error("split_layer", e)) from None

    try:
        train_tokens = tokenize(train, tokenizer, seq_len)
        eval_tokens = tokenize(eval_examples, tokenizer, seq_len)
    except ValueError as e:
        raise TrainInputError(_field_error("seq_len", e)) from None
    client_data = [train_tokens.select(idx) for idx in parts]
    hyper = Hyper(
        mode=config.mode,
        local_steps=config.local_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        server_adapter=config.server_adapter,
        act_bits=config.act_bits,
        client_batching=config.client_batching,
        server_chunk=config.server_chunk,
    )
    try:
        federation = make_federation(split, client_data, hyper)
    except ValueError as e:
        raise TrainInputError(_one_line(e)) from None
    engine: RoundEngine = federation
    if config.engine == "flower-sim":
        engine = flower_simulation(config, federation)
    elif config.engine == "dataplane":
        engine = data_plane(config, federation)
    elif config.engine == "flower-deployment":
        if make_engine is None:
            raise TrainInputError("engine: 'flower-deployment' runs inside a Flower ServerApp (`flwr run`, "
                                  "scripts/local-deployment.sh, docs/deployment.md); here use --engine local, "
                                  "flower-sim or dataplane")
        engine = make_engine(config, federation)
    return _Run(config, seq_len, split, tokenizer, engine, device, eval_tokens, generation_examples)


FLOWER_HINT = 'pip install "sflllm[flower]"'
MakeEngine = Callable[[TrainConfig, Federation], RoundEngine]


def flower_simulation(config: TrainConfig, federation: Federation) -> RoundEngine:
    """The run in Flower's Simulation Engine: ``federation`` serves the main server; every simulated
    client rebuilds its part from ``config`` alone (:func:`flower_client`)."""
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise TrainInputError(f"engine: 'flower-sim' needs Flower and its simulation backend; {FLOWER_HINT}")
    from sflllm.flower import FlowerSimulation

    return FlowerSimulation(federation, functools.partial(flower_client, config.model_dump_json()))


def data_plane(config: TrainConfig, federation: Federation) -> RoundEngine:
    """The run with every cut exchange over the gRPC data plane (TLS, token) on 127.0.0.1, in this process."""
    if importlib.util.find_spec("grpc") is None or importlib.util.find_spec("cryptography") is None:
        raise TrainInputError(f"engine: 'dataplane' needs grpcio and cryptography; {FLOWER_HINT}")
    from sflllm.deploy import DataPlaneRehearsal

    return DataPlaneRehearsal(federation)


def flower_client(config_json: str, k: int) -> tuple[torch.nn.Module, ClientState]:
    """Client k of a flower-sim run, built inside a simulation worker from the run's config: its part
    of the split model and its client (data, fresh adapter and streams; the ClientApp loads its state)."""
    fed = client_federation(config_json)
    return fed.split.client, fed.clients[k]


def client_federation(config_json: str) -> Federation:
    """The run's in-process federation rebuilt from its config alone (JSON of a TrainConfig), in a
    client's process: a Flower ClientApp takes its part of the split model and its client from it."""
    federation = _local_run(config_json).federation
    assert isinstance(federation, Federation)  # engine "local"
    return federation


@functools.lru_cache(maxsize=2)
def _local_run(config_json: str) -> _Run:
    config = TrainConfig.model_validate({**json.loads(config_json), "engine": "local"})
    run = prepare(config)
    threads = intra_op_threads(config, run.split.full)
    if threads is not None:
        torch.set_num_threads(threads)  # the worker process runs this one client's work only
    return run


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
    """The config fields that determine adapters and per-round metrics and must match on resume
    (all but RESUME_OVERRIDES: lr may change deliberately, see config.RESUME_OVERRIDES)."""
    return config.model_dump(mode="json", exclude=set(RESUME_OVERRIDES))


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
    saved_trajectory = {k: v for k, v in saved_trajectory.items() if k not in RESUME_OVERRIDES}
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


def _initial_metrics(run: _Run) -> dict[str, Any]:
    """``metrics.json`` before the first round: the held-out loss of the untrained adapters."""
    loss = heldout_loss(run.split.full, run.eval_tokens, run.config.batch_size)
    if not math.isfinite(loss):
        raise TrainInputError(f"model: the held-out loss before training is {loss} (not finite); "
                              "check the model's weights, lora_alpha and seq_len")
    return {
        "schema": METRICS_SCHEMA,
        "demo": run.config.is_demo,
        "mode": run.config.mode,
        "seq_len": run.seq_len,
        "initial": {"heldout_loss": loss},
        "rounds": [],
        "final": None,
    }


def run_train(
    config: TrainConfig,
    output_dir: Path | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
    force: bool = False,
    make_engine: MakeEngine | None = None,
) -> TrainResult:
    """Train from scratch into ``output_dir`` (default :func:`default_output_dir`; must not exist or be empty).

    ``force`` trains even where the peak memory estimate exceeds the available memory.
    Returns the output dir and the metrics written to ``metrics.json``.
    """
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    check_new_output_dir(out)
    run = prepare(config, force=force, make_engine=make_engine)
    with torch_threads(intra_op_threads(config, run.split.full)):
        metrics = _initial_metrics(run)
        ensure_output_dir(out, "output")
        write_atomic(out / CONFIG_FILE, config_to_yaml(config).encode("utf-8"))
        try:
            return _train_rounds(out, run, metrics, console or Console(soft_wrap=True), progress)
        finally:
            run.federation.close()


def resume_train(
    output_dir: Path,
    overrides: dict[str, Any] | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
    force: bool = False,
    make_engine: MakeEngine | None = None,
) -> TrainResult:
    """Continue the run in ``output_dir`` (e.g. with a larger ``rounds``) to the same result as an uninterrupted run.

    Only fields in ``RESUME_OVERRIDES`` may be overridden: those that leave the trajectory as it
    was, and ``lr`` (deliberately: to continue a diverged run from its last good checkpoint with a
    lower learning rate; the result then differs from an uninterrupted run). Every checkpoint is
    validated before any file in ``output_dir`` is rewritten. A run stopped before its first
    checkpoint (``DIR`` holds config.yaml, and metrics.json if it diverged) starts again from round 1.
    """
    out = Path(output_dir)
    check_resumable(out)
    # a run stopped during its first round has no state: resuming starts it afresh
    first_round = {p.name for p in out.iterdir()} <= {CONFIG_FILE, METRICS_FILE}
    if not first_round and not (out / STATE_FILE).is_file():
        raise TrainInputError(f"resume: {out / STATE_FILE} not found; is {out} the output of `sflllm train`?")
    saved = read_config_file(out / CONFIG_FILE)
    saved_config = resolve_config(saved, {}, source=str(out / CONFIG_FILE))
    overrides = dict(overrides or {})
    changed = sorted(k for k, v in overrides.items() if k not in RESUME_OVERRIDES and getattr(saved_config, k, v) != v)
    if changed:
        raise TrainInputError(
            f"resume: {', '.join(changed)} cannot change when resuming {out} "
            f"(only {', '.join(sorted(RESUME_OVERRIDES))} can)"
        )
    config = resolve_config(saved, overrides, source=f"resume {out}")
    run = prepare(config, force=force, make_engine=make_engine)
    with torch_threads(intra_op_threads(config, run.split.full)):
        metrics = _initial_metrics(run) if first_round else _load_resume_state(out, run)
        metrics["final"] = None
        metrics.pop("diverged", None)
        done = len(metrics["rounds"])
        if done >= config.rounds:
            raise TrainInputError(f"resume: {out} already has {done} rounds; pass --rounds greater than {done}")
        write_atomic(out / CONFIG_FILE, config_to_yaml(config).encode("utf-8"))
        try:
            return _train_rounds(out, run, metrics, console or Console(soft_wrap=True), progress)
        finally:
            run.federation.close()


def _train_rounds(out: Path, run: _Run, metrics: dict[str, Any], console: Console, show: bool) -> TrainResult:
    config = run.config
    if config.is_demo:
        console.print(f"[bold yellow]demo:[/] {_demo_what(config)}; {REAL_RUN_HINT}", highlight=False)
    auto = " (auto: the longest training example, at most the model's positions)" if config.seq_len == "auto" else ""
    console.print(
        f"training {config.mode} on {run.device}{' (auto)' if config.device == 'auto' else ''} in {config.dtype} "
        f"| K={config.clients} clients, split_layer={config.split_layer}, rank={config.rank}, "
        f"local_steps={config.local_steps}, rounds={config.rounds}, seq_len={run.seq_len}{auto} | "
        f"held-out loss before training {metrics['initial']['heldout_loss']:.4f}",
        highlight=False,
    )
    if config.engine != "local":
        start = time.perf_counter()
        waiting = console.status(f"engine {config.engine}: starting {config.clients} clients") if show else nullcontext()
        with waiting:
            run.federation.start()  # outside the rounds' wall times
        console.print(f"engine {config.engine}: started in {time.perf_counter() - start:.1f} s", highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True, disable=not show) as bar:
            for r in range(len(metrics["rounds"]), config.rounds):
                _train_round(out, run, metrics, r, bar, console)
    except TrainDiverged:
        write_json_atomic(out / METRICS_FILE, metrics)  # strict JSON: the good rounds and the "diverged" flag
        raise
    except KeyboardInterrupt:
        raise TrainInterrupted(
            f"interrupted after round {len(metrics['rounds'])}; continue with: sflllm train --resume {out}"
        ) from None
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
        for note in final["generation"]["notes"]:
            console.print(f"  note: {note}", highlight=False, markup=False)
    console.print(f"results in {out}/ ({METRICS_FILE}, {CONFIG_FILE}, *.safetensors)", highlight=False, markup=False)
    return TrainResult(out, metrics)


def _train_round(out: Path, run: _Run, metrics: dict[str, Any], r: int, bar: Progress, console: Console) -> None:
    """Round ``r`` (0-based): train, check every iteration for divergence, evaluate, checkpoint, report.

    On divergence ``metrics`` gets a ``"diverged"`` entry and TrainDiverged is raised; the files in
    ``out`` still hold round ``r``'s start (the last good checkpoint).
    """
    config = run.config

    def diverged(where: str, what: str) -> TrainDiverged:
        metrics["diverged"] = {"round": r + 1, "where": where, "what": what}
        return TrainDiverged(diverged_message(r + 1, where, what, out, config.lr))

    def after_iteration(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)
        bad = check_finite(run.federation.state_dict())
        if bad is not None:
            raise diverged(f"iteration {done}", f"{bad} (an adapter, or AdamW's moments of its gradient)")

    before = split_adapters(run.split)
    task = bar.add_task(f"round {r + 1}/{config.rounds}", total=config.local_steps)
    start = time.perf_counter()
    stats = run.federation.run_round(r, progress=after_iteration)
    wall = time.perf_counter() - start
    bar.remove_task(task)
    run.federation.load_global_adapter()
    train_loss = float(stats["train_loss"])
    if not math.isfinite(train_loss):
        raise diverged("training", f"train loss is {train_loss}")
    loss = heldout_loss(run.split.full, run.eval_tokens, config.batch_size)
    if not math.isfinite(loss):
        raise diverged("held-out evaluation", f"held-out loss is {loss}")
    after = split_adapters(run.split)
    if all(unchanged(b, a) for b, a in zip(before, after)):
        warnings.warn(f"round {r + 1} left the adapters unchanged (every update was 0): lower --lora-alpha "
                      "or raise --lr", stacklevel=1)
    record = {
        "round": r + 1,
        "train_loss": train_loss,
        "heldout_loss": loss,
        "samples": int(stats["samples"]),
        "wall_time_s": wall,
        "lr": config.lr,
    } | ({"dropped": stats["dropped"]} if "dropped" in stats else {})
    metrics["rounds"].append(record)
    _save_round(out, run, metrics)
    console.print(
        f"round {r + 1}/{config.rounds}: train loss {record['train_loss']:.4f}, "
        f"held-out loss {record['heldout_loss']:.4f}, {wall:.2f} s"
        + "".join(f"; client {k} dropped: {why}" for k, why in record.get("dropped", {}).items()),
        highlight=False,
        markup=False,
    )


def _final_metrics(run: _Run, metrics: dict[str, Any], out: Path) -> dict[str, Any]:
    """Held-out loss and perplexity of the merged (global client + server) model; generation scores if asked."""
    loss = metrics["rounds"][-1]["heldout_loss"]
    generation = generation_metrics(run, out) if run.config.generate else None
    return {"heldout_loss": loss, "perplexity": math.exp(loss), "generation": generation}


def generation_metrics(run: _Run, out: Path) -> dict[str, Any]:
    """E2E metrics of the merged model's generations for the held-out MRs, with the decoding settings;
    writes the hypotheses, references and MRs in the official scorer's plain-text format."""
    from sflllm.experiments.evaluation import evaluate_generation  # the metrics' imports: only if asked
    from sflllm.metrics import format_hypotheses, format_references

    config = run.config
    scores, mrs, hypotheses, references = evaluate_generation(
        run.split.full,
        run.tokenizer,
        run.generation_examples,
        num_beams=config.num_beams,
        length_penalty=config.length_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        max_new_tokens=config.max_new_tokens,
    )
    write_atomic(out / HYPOTHESES_FILE, format_hypotheses(hypotheses).encode("utf-8"))
    write_atomic(out / REFERENCES_FILE, format_references(references).encode("utf-8"))
    write_atomic(out / MRS_FILE, format_hypotheses(mrs).encode("utf-8"))
    return scores


def _demo_what(config: TrainConfig) -> str:
    parts = []
    if config.model is None:
        parts.append("built-in tiny GPT-2 (random init)")
    if config.data is None:
        parts.append("synthetic E2E-style data")
    return " + ".join(parts)


def _naming(message: str, field: str, value: str) -> str:
    """``message`` prefixed so that it names both the option ``field`` and its ``value`` once (a long
    value cut to MAX_ECHO_CHARS)."""
    if len(value) > MAX_ECHO_CHARS:
        message, value = message.replace(value, f"{value[:MAX_ECHO_CHARS]}..."), f"{value[:MAX_ECHO_CHARS]}..."
    if value not in message:
        return f"{field} {value!r}: {message}"
    return message if message.startswith(field) else f"{field}: {message}"


def _field_error(field: str, e: BaseException) -> str:
    """``field: message`` without repeating ``field`` when the message already starts with it."""
    message = _one_line(e)
    return message if message.startswith(field) else f"{field}: {message}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
