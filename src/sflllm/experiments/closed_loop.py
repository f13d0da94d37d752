"""``sflllm run``: optimise the allocation for the model actually trained, train with the choice,
and compare every method by held-out loss against simulated wall-clock time.

Steps (all validation happens before ``DIR`` is created; nothing is left in it on bad input):

1. The scenario (``--scenario``, else :data:`DEMO_SCENARIO`) gives K, I, b, s, the rank set, E(r), the
   clients and the network. ``--calibration DIR`` replaces its ``training.ranks`` and
   ``training.rounds_per_rank`` with the measured ones (``sflllm calibrate``). ``--act-bits`` overrides
   ``model.act_bits``. The run has no flags for K, I, b or s, so they cannot contradict the scenario:
   the scenario is their single source; ``--act-bits`` is the one override, said in the report.
   Several ``--calibration`` folders, measured at different act_bits with one target loss, make the
   search choose the precision too (the fastest precision's plan is kept; beyond the paper).
2. The model profile is the trained model's own (its HF config), never the scenario's preset.
3. The optimiser (spec §5) picks (l, r) and allocations for ``proposed`` and every baseline.
4. Every distinct (l, r) among the methods is trained once (``sflllm train``'s engine, same data and
   seed) into ``DIR/pairs/l<l>-r<r>-q<bits>/``; methods that share a pair share its trace.
5. For every method and round, the allocation in force (:mod:`sflllm.allocation.rounds`) gives that
   round's T_round (spec §4); the simulated time after round t is the sum of T_round over rounds 1..t.
6. Time to the target loss per method, and proposed's reduction against each baseline.

``--resume DIR`` continues an interrupted run: it plans again from the saved inputs (``run.yaml``,
``scenario_input.yaml``; deterministic from the seeds), and every pair's training resumes
bit-identically from its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from sflllm.allocation.optimize import BASELINES, Outcome, optimise
from sflllm.allocation.rounds import FADING, RoundAllocation, round_allocations
from sflllm.allocation.scenario import Realised, Scenario, ScenarioError, realise, scenario_from_mapping, scenario_to_yaml
from sflllm.cost.profile import ModelProfile, activation_bits
from sflllm.experiments.calibrate import read_calibration, rounds_to_reach
from sflllm.experiments.checkpoint import write_atomic
from sflllm.experiments.config import TrainConfig, TrainInputError, config_to_yaml
from sflllm.experiments.run_options import RunOptions, cut_bits
from sflllm.experiments.run_inputs import (
    DEMO_SCENARIO,
    DEMO_TARGET_LOSS,
    architecture_digest,
    check_ranks,
    data_source,
    load_run_scenario,
    model_profile,
    model_source,
    output_folder,
    pair_train_config,
    saved_options,
    train_pair,
)
from sflllm.experiments.train import load_model_and_tokenizer, prepare

METHODS = ("proposed", *BASELINES)
RUN_FILE = "run.yaml"
SCENARIO_FILE = "scenario.yaml"
SCENARIO_INPUT_FILE = "scenario_input.yaml"
MODEL_CONFIG_FILE = "model_config.json"
PAIRS_DIR = "pairs"
RUN_METRICS_SCHEMA = "sflllm.run.metrics/1"

@dataclass(frozen=True)
class Plan:
    """Everything decided before training: the realised scenario, the optimiser's outcome, what to train."""

    options: RunOptions
    scenario: Scenario            # after calibration and overrides; model section as given
    realised: Realised            # with the trained model's profile
    outcome: Outcome
    method_pairs: dict[str, tuple[int, int]]
    rounds: int
    act_bits: int
    train_configs: dict[str, TrainConfig]   # pair key -> config (incl. the reference, if any)
    method_keys: dict[str, str]              # method -> pair key
    reference_key: str | None                # proposed's pair with an unquantised cut (the dtype's bits) when act_bits is below them
    target_loss: float | None
    target_source: str
    overrides: tuple[str, ...]
    precision_search: dict[str, dict[str, Any]] | None  # act_bits -> proposed's plan at that precision
    model_source: str
    model_config_json: dict[str, Any]


def _pair_key(l: int, r: int, bits: int) -> str:
    return f"l{l}-r{r}-q{bits}"


def _check_calibration(cal: dict[str, Any], folder: Path, scenario: Scenario, source: str, digest: str,
                       act_bits: int, options: RunOptions) -> None:
    """The calibration must come from this model and the scenario's K, I, b, s, act_bits, dtype, data and seed."""
    if cal.get("model") != source or cal.get("architecture") != digest:
        raise TrainInputError(f"calibration: {folder} was measured on model {cal.get('model')!r}, "
                              f"but this run trains {source!r}; calibrate this model first")
    training = scenario.training
    expected = {"clients": scenario.clients.count, "local_steps": training.local_steps,
                "batch_size": training.batch_size, "seq_len": scenario.model.seq_len, "act_bits": act_bits,
                "seed": scenario.seed, "data": data_source(options.data), "eval_data": data_source(options.eval_data),
                "train_samples": options.train_samples, "dtype": options.dtype}
    recorded = {"dtype": "float32"}  # calibrations written before --dtype existed trained in float32
    for key, value in expected.items():
        if cal.get(key, recorded.get(key)) != value:
            raise TrainInputError(f"calibration: {folder} was measured with {key}={cal.get(key)!r}, "
                                  f"this run has {key}={value!r}; calibrate with the same scenario and data")


# --------------------------------------------------------------------------- planning (no writes)

def _with_training(scenario: Scenario, **training: Any) -> Scenario:
    data = scenario.model_dump(mode="json")
    data["training"].update(training)
    try:
        return scenario_from_mapping(data)
    except ScenarioError as e:
        raise TrainInputError(str(e)) from None


def _with_bits(scenario: Scenario, bits: int) -> Scenario:
    return scenario.model_copy(update={"model": scenario.model.model_copy(update={"act_bits": bits})})


def _optimised(scenario: Scenario, profile: ModelProfile) -> tuple[Realised, Outcome]:
    """The scenario realised for the trained model's profile (every check against the model) and optimised."""
    check_ranks(scenario.training.ranks, profile)
    try:
        realised = realise(scenario, profile)
        return realised, optimise(realised)
    except ScenarioError as e:
        raise TrainInputError(str(e)) from None


def _check_comparable(calibrations: list[tuple[Path, dict[str, Any]]]) -> None:
    """Several calibrations (one per precision) must differ in act_bits only and share one target loss."""
    bits = [cal.get("act_bits") for _, cal in calibrations]
    if len(set(bits)) != len(bits):
        raise TrainInputError(f"calibration: the folders must be measured at different act_bits, got {bits}")
    targets = {cal.get("target_loss") for _, cal in calibrations}
    if len(targets) > 1:
        raise TrainInputError(f"calibration: the folders use different target losses {sorted(targets)}; calibrate "
                              "every precision with the same --target-loss so that their E(r) compare")


def plan_run(options: RunOptions) -> Plan:
    """Load, check and optimise; decide what to train. Writes nothing."""
    scenario = load_run_scenario(options)
    overrides: list[str] = []
    if len(options.calibration) > 1 and options.act_bits is not None:
        raise TrainInputError("--act-bits: with several --calibration folders the search chooses the precision; "
                              "drop --act-bits or keep one calibration")
    act_bits = cut_bits(options, scenario)
    if act_bits not in (32, 16, 8):
        raise TrainInputError(f"model.act_bits: {act_bits} is not a cut precision sflllm trains with (32, 16 or 8)")
    if options.act_bits is not None and act_bits != scenario.model.act_bits:
        overrides.append(f"--act-bits {act_bits} overrides the scenario's model.act_bits = {scenario.model.act_bits}")
    elif act_bits != scenario.model.act_bits:
        overrides.append(f"act_bits = {act_bits}: the scenario does not set model.act_bits, so q_act follows "
                         f"--dtype {options.dtype}")

    probe = TrainConfig(model=options.model, lora_targets=scenario.model.lora_targets)
    model, _ = load_model_and_tokenizer(probe)
    profile = model_profile(model, scenario.model.lora_targets)
    source, digest = model_source(options.model), architecture_digest(profile)

    target_loss, target_source = options.target_loss, "--target-loss"
    candidates: dict[int, tuple[Scenario, Realised, Outcome]] = {}
    calibrations = [(Path(folder), read_calibration(Path(folder))) for folder in options.calibration]
    if len(calibrations) > 1:
        _check_comparable(calibrations)
    for folder, cal in calibrations:
        bits = int(cal.get("act_bits", 0)) if len(calibrations) > 1 else act_bits
        at_bits = _with_bits(scenario, bits)
        _check_calibration(cal, folder, at_bits, source, digest, bits, options)
        table = {int(k): int(v) for k, v in cal["rounds_per_rank"].items()}
        if not table:
            raise TrainInputError(f"calibration: no rank of {folder} reached its target loss; nothing to optimise")
        at_bits = _with_training(at_bits, ranks=sorted(table), rounds_per_rank=table)
        candidates[bits] = (at_bits, *_optimised(at_bits, profile))
        overrides.append(f"E(r) and the rank set at {bits} bits come from the calibration in {folder}")
        if target_loss is None:
            target_loss, target_source = float(cal["target_loss"]), f"the calibration's target ({folder})"
    if not candidates:
        at_bits = _with_bits(scenario, act_bits)
        candidates[act_bits] = (at_bits, *_optimised(at_bits, profile))
    act_bits = min(candidates, key=lambda bits: (candidates[bits][2].proposed.total_delay_s, -bits))
    scenario, realised, outcome = candidates[act_bits]
    precision_search = None
    if len(candidates) > 1:
        precision_search = {str(bits): {"split_layer": o.proposed.split_layer, "rank": o.proposed.rank,
                                        "rounds": r.rounds(o.proposed.rank), "planned_total_delay_s": o.proposed.total_delay_s}
                            for bits, (_, r, o) in sorted(candidates.items(), reverse=True)}
        overrides.append(f"the search chose act_bits = {act_bits} among {sorted(candidates, reverse=True)}")
    if target_loss is None and options.scenario is None:
        target_loss, target_source = DEMO_TARGET_LOSS, "the demo scenario's calibration target"
    if target_loss is None:
        target_source = "the highest final held-out loss among the trained (l, r): every method reaches it"

    optimiser = outcome.optimiser
    random_subchannel, random_all = optimiser.random_baselines()  # their first draw's (l, r), as optimize shows
    solutions = {"proposed": outcome.proposed, "random_subchannel": random_subchannel,
                 "equal_power": optimiser.equal_power(), "fixed_split": optimiser.fixed_split(),
                 "fixed_rank": optimiser.fixed_rank(), "random_all": random_all}
    method_pairs = {m: (solutions[m].split_layer, solutions[m].rank) for m in METHODS}
    rounds = options.rounds or max(realised.rounds(r) for _, r in method_pairs.values())

    train_configs: dict[str, TrainConfig] = {}
    method_keys: dict[str, str] = {}
    for method, (l, r) in method_pairs.items():
        key = _pair_key(l, r, act_bits)
        method_keys[method] = key
        if key not in train_configs:
            train_configs[key] = pair_train_config(options, scenario, l, r, act_bits, rounds)
    reference_key = None
    native = activation_bits(options.dtype)  # a cut of the base dtype, unquantised: the reference precision
    if act_bits < native:
        l, r = method_pairs["proposed"]
        reference_key = _pair_key(l, r, native)
        train_configs[reference_key] = pair_train_config(options, scenario, l, r, native, rounds)
    prepare(train_configs[method_keys["proposed"]])  # model, data, partition, split layer: errors now, not later
    return Plan(options=options, scenario=scenario, realised=realised, outcome=outcome, method_pairs=method_pairs,
                rounds=rounds, act_bits=act_bits, train_configs=train_configs, method_keys=method_keys,
                reference_key=reference_key, target_loss=target_loss, target_source=target_source,
                overrides=tuple(overrides), precision_search=precision_search, model_source=source,
                model_config_json=model.config.to_dict())


# --------------------------------------------------------------------------- composing the results

def method_record(method: str, trace: dict[str, Any], allocations: list[RoundAllocation], pair_key: str,
                  target: float) -> dict[str, Any]:
    """Per round: T_round, simulated time so far, measured wall time so far, held-out loss, the allocation."""
    rounds = []
    sim = wall = 0.0
    for record, alloc in zip(trace["rounds"], allocations, strict=True):
        sim += alloc.delay.round_delay_s
        wall += record["wall_time_s"]
        rounds.append({**alloc.as_json(), "sim_time_s": sim, "wall_time_s": wall,
                       "heldout_loss": record["heldout_loss"], "train_loss": record["train_loss"]})
    reached = rounds_to_reach([r["heldout_loss"] for r in rounds], target)
    at = None if reached is None else rounds[reached - 1]["sim_time_s"]
    return {"split_layer": allocations[0].split_layer, "rank": allocations[0].rank, "pair": pair_key,
            "initial_heldout_loss": trace["initial"]["heldout_loss"], "rounds": rounds,
            "rounds_to_target": reached, "time_to_target_s": at,
            "final_heldout_loss": rounds[-1]["heldout_loss"], "final_sim_time_s": rounds[-1]["sim_time_s"]}


def headline(methods: dict[str, dict[str, Any]], rounds_per_rank: dict[str, int]) -> list[dict[str, Any]]:
    """Per method: planned E(r), measured rounds and time to target, proposed's reduction (1 - T_proposed / T_method)."""
    ours = methods["proposed"]["time_to_target_s"]
    rows = []
    for name, record in methods.items():
        theirs = record["time_to_target_s"]
        reduction = None
        if name != "proposed" and ours is not None and theirs is not None and theirs > 0:
            reduction = 1.0 - ours / theirs
        rows.append({"method": name, "split_layer": record["split_layer"], "rank": record["rank"],
                     "planned_rounds": rounds_per_rank[str(record["rank"])], "rounds_to_target": record["rounds_to_target"], "time_to_target_s": theirs,
                     "final_heldout_loss": record["final_heldout_loss"], "reduction_by_proposed": reduction})
    return rows


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]
    report: Path


def compose(plan: Plan, traces: dict[str, dict[str, Any]], pair_dirs: dict[str, str]) -> dict[str, Any]:
    """``metrics.json`` of the run from the trained traces and each round's simulated allocation."""
    allocations = round_allocations(plan.realised, plan.method_pairs, plan.rounds, plan.options.fading)
    target = plan.target_loss
    if target is None:
        target = max(trace["rounds"][-1]["heldout_loss"] for key, trace in traces.items() if key != plan.reference_key)
    methods = {m: method_record(m, traces[plan.method_keys[m]], allocations[m], plan.method_keys[m], target)
               for m in METHODS}
    precision = None
    if plan.reference_key is not None:
        native = plan.train_configs[plan.reference_key].act_bits
        realised_native = realise(_with_bits(plan.scenario, native), plan.realised.profile)
        alloc_native = round_allocations(realised_native, {"proposed": plan.method_pairs["proposed"]}, plan.rounds,
                                         plan.options.fading)["proposed"]
        ref = method_record("proposed", traces[plan.reference_key], alloc_native, plan.reference_key, target)
        ours = methods["proposed"]
        precision = {
            "act_bits": plan.act_bits, "reference_bits": native, "pair": plan.reference_key,
            "final_heldout_loss": ours["final_heldout_loss"], "reference_final_heldout_loss": ref["final_heldout_loss"],
            "final_loss_cost": ours["final_heldout_loss"] - ref["final_heldout_loss"],
            "max_round_loss_gap": max(abs(a["heldout_loss"] - b["heldout_loss"])
                                      for a, b in zip(ours["rounds"], ref["rounds"])),
            "time_to_target_s": ours["time_to_target_s"], "reference_time_to_target_s": ref["time_to_target_s"],
            "reference_round_delay_s": ref["rounds"][0]["round_delay_s"],
            "reference_rounds": ref["rounds"],
        }
    realised = plan.realised
    training = realised.scenario.training
    return {
        "schema": RUN_METRICS_SCHEMA,
        "model": plan.model_source,
        "fading": plan.options.fading,
        "act_bits": plan.act_bits,
        "rounds": plan.rounds,
        "target_loss": target,
        "target_source": plan.target_source,
        "overrides": list(plan.overrides),
        "scenario": {"clients": realised.num_clients, "local_steps": training.local_steps,
                     "batch_size": training.batch_size, "seq_len": realised.scenario.model.seq_len,
                     "ranks": list(training.ranks),
                     "rounds_per_rank": {str(r): realised.rounds(r) for r in training.ranks},
                     "split_layers": list(realised.split_layers), "num_layers": realised.profile.num_layers,
                     "ms_subchannels": realised.gains_ms.shape[1], "fs_subchannels": realised.gains_fs.shape[1],
                     "seed": realised.scenario.seed},
        "chosen": {"split_layer": plan.method_pairs["proposed"][0], "rank": plan.method_pairs["proposed"][1],
                   "rounds_E": realised.rounds(plan.method_pairs["proposed"][1]),
                   "planned_total_delay_s": plan.outcome.proposed.total_delay_s},
        "planned_total_delay_s": {"proposed": plan.outcome.proposed.total_delay_s, **plan.outcome.baselines},
        "pairs": {key: {"dir": pair_dirs[key], "initial_heldout_loss": trace["initial"]["heldout_loss"],
                        "rounds": trace["rounds"]} for key, trace in traces.items()},
        "methods": methods,
        "headline": headline(methods, {str(r): realised.rounds(r) for r in training.ranks}),
        "precision": precision,
        "precision_search": plan.precision_search,
    }


# --------------------------------------------------------------------------- the run

def _write_inputs(out: Path, plan: Plan) -> None:
    """run.yaml and scenario_input.yaml (the inputs: --resume plans again from them), scenario.yaml (the
    realised scenario as used) and model_config.json."""
    import json

    saved = plan.realised.scenario.model_copy(update={"model": plan.realised.scenario.model.model_copy(
        update={"preset": None, "hf_config": MODEL_CONFIG_FILE})})
    write_atomic(out / MODEL_CONFIG_FILE, (json.dumps(plan.model_config_json, indent=2) + "\n").encode("utf-8"))
    header = ("# The realised scenario of this run: every draw explicit, E(r) and act_bits as used, and the\n"
              "# trained model's own config as model.hf_config (`sflllm optimize --scenario` reproduces the plan).\n")
    write_atomic(out / SCENARIO_FILE, (header + scenario_to_yaml(saved)).encode("utf-8"))
    inputs: dict[str, Any] = {"calibration": tuple(str(Path(c).resolve()) for c in plan.options.calibration)}
    if plan.options.scenario is not None:
        write_atomic(out / SCENARIO_INPUT_FILE, scenario_to_yaml(load_run_scenario(plan.options)).encode("utf-8"))
        inputs["scenario"] = SCENARIO_INPUT_FILE
    write_atomic(out / RUN_FILE, config_to_yaml(plan.options.model_copy(update=inputs)).encode("utf-8"))  # type: ignore[arg-type]


def run_closed_loop(options: RunOptions, output_dir: Path | None = None, *, console: Console | None = None,
                    progress: bool = True, resume: bool = False) -> RunResult:
    """Plan, train every distinct (l, r), simulate each round's allocation, write the report."""
    console = console or Console(soft_wrap=True)
    out = output_folder(output_dir, resume=resume, options_file=RUN_FILE, command="run")
    if resume:
        options = saved_options(out, RUN_FILE, RunOptions, relative=("scenario",))
    plan = plan_run(options)
    _announce(plan, console)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _write_inputs(out, plan)
    traces: dict[str, dict[str, Any]] = {}
    pair_dirs: dict[str, str] = {}
    for n, (key, config) in enumerate(plan.train_configs.items(), start=1):
        users = [m for m, k in plan.method_keys.items() if k == key] or ["unquantised reference"]
        console.print(f"[bold]pair {n}/{len(plan.train_configs)}[/]: l = {config.split_layer}, r = {config.rank}, "
                      f"{config.act_bits}-bit cut, for {', '.join(users)}", highlight=False)
        folder = out / PAIRS_DIR / key
        folder.parent.mkdir(exist_ok=True)
        traces[key] = train_pair(folder, config, console, progress).metrics
        pair_dirs[key] = f"{PAIRS_DIR}/{key}"
    metrics = compose(plan, traces, pair_dirs)
    from sflllm.experiments.run_report import write_outputs

    report = write_outputs(out, plan, metrics)
    _print_headline(metrics, report, console)
    return RunResult(out, metrics, report)


def _announce(plan: Plan, console: Console) -> None:
    realised = plan.realised
    training = realised.scenario.training
    l, r = plan.method_pairs["proposed"]
    console.print(
        f"scenario: K={realised.num_clients}, I={training.local_steps}, b={training.batch_size}, "
        f"s={realised.scenario.model.seq_len}, model {plan.model_source} (L={realised.profile.num_layers}, "
        f"d={realised.profile.hidden_size}), {plan.act_bits}-bit cut, {plan.options.fading} fading",
        highlight=False)
    console.print(f"optimiser: proposed (l, r) = ({l}, {r}), E(r) = {realised.rounds(r)}, planned T_total "
                  f"{plan.outcome.proposed.total_delay_s:.4g} s; training {len(plan.train_configs)} distinct (l, r) "
                  f"for {plan.rounds} rounds each", highlight=False)
    for line in plan.overrides:
        console.print(f"note: {line}", highlight=False)


def _print_headline(metrics: dict[str, Any], report: Path, console: Console) -> None:
    from sflllm.experiments.run_report import headline_markdown

    console.print(f"\ntime to held-out loss {metrics['target_loss']:.4f} ({metrics['fading']} channels):",
                  highlight=False)
    console.print(headline_markdown(metrics), highlight=False, markup=False)
    console.print(f"report: {report}", highlight=False, markup=False)


__all__ = ["DEMO_SCENARIO", "DEMO_TARGET_LOSS", "FADING", "METHODS", "Plan", "RunOptions", "RunResult", "plan_run",
           "run_closed_loop"]
