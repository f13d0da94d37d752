"""`sflllm train` and run_train/resume_train: offline default, metrics.json, YAML + flags, resume, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sflllm.experiments.train as train_mod
from sflllm.cli import app
from sflllm.experiments.config import TrainConfig, read_config_file
from sflllm.experiments.train import (
    CLIENT_ADAPTER_FILE,
    CONFIG_FILE,
    HYPOTHESES_FILE,
    METRICS_FILE,
    MRS_FILE,
    REFERENCES_FILE,
    SERVER_ADAPTER_FILE,
    STATE_FILE,
    intra_op_threads,
    resume_train,
    run_train,
)
from sflllm.sfl import Federation

# A small demo run (built-in model, synthetic data) that still learns.
TINY = dict(clients=2, local_steps=2, batch_size=4, train_samples=48, eval_samples=16)
TINY_FLAGS = ["--clients", "2", "--local-steps", "2", "--batch-size", "4", "--train-samples", "48", "--eval-samples", "16"]

runner = CliRunner()


def _train(*args: str, quiet: bool = True):
    return runner.invoke(app, ["train", *(["--quiet"] if quiet else []), *args])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def _assert_clean_error(result, *needles: str) -> None:
    """Exit code 2, exactly one `error: ...` line naming every needle, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _without_wall_times(metrics: dict) -> dict:
    return {**metrics, "rounds": [{k: v for k, v in r.items() if k != "wall_time_s"} for r in metrics["rounds"]]}


def test_offline_default_runs_end_to_end_without_any_hub(tmp_path, monkeypatch):
    def no_hub(name):
        raise AssertionError(f"the offline default must not load a pretrained model ({name})")

    monkeypatch.setattr(train_mod, "load_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    result = _train("--rounds", "2", "--local-steps", "3", quiet=False)  # with the progress bar
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # the demo's single intra-op thread is not left behind
    assert "demo" in result.output and "--model" in result.output  # says it is a demo, and how to run a real model

    (out,) = (tmp_path / "runs").iterdir()  # default output dir runs/<timestamp>
    assert f"results in {Path('runs') / out.name}" in result.output
    assert {p.name for p in out.iterdir()} == {
        CONFIG_FILE, METRICS_FILE, STATE_FILE, CLIENT_ADAPTER_FILE, SERVER_ADAPTER_FILE
    }  # no temp files left behind

    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["schema"] == "sflllm.train.metrics/1" and metrics["demo"] is True and metrics["mode"] == "sfl"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert set(r) == {"round", "train_loss", "heldout_loss", "samples", "wall_time_s", "lr"}
        assert r["samples"] == 3 * 3 * 8  # K * I * b with the defaults K=3, b=8
        assert r["wall_time_s"] > 0 and math.isfinite(r["train_loss"])
    final = metrics["final"]
    assert final["heldout_loss"] == metrics["rounds"][-1]["heldout_loss"]
    assert final["perplexity"] == pytest.approx(math.exp(final["heldout_loss"]))
    assert final["generation"] is None
    # real learning: the held-out loss drops clearly below its value before training
    assert final["heldout_loss"] < metrics["initial"]["heldout_loss"] - 0.1

    config = TrainConfig.model_validate(read_config_file(out / CONFIG_FILE))
    assert config == TrainConfig(rounds=2, local_steps=3)
    client = load_file(out / CLIENT_ADAPTER_FILE)
    server = load_file(out / SERVER_ADAPTER_FILE)
    # split_layer=1: the client adapter covers block 0 only, the server adapter the other blocks
    assert client and all(".h.0." in name and "lora_" in name for name in client)
    assert server and not any(".h.0." in name for name in server)
    assert any(t.abs().sum() > 0 for name, t in client.items() if "lora_B" in name)  # trained, not the zero init


def test_narrow_models_train_on_one_thread_unless_threads_is_given():
    def model(hidden_size):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))

    assert intra_op_threads(TrainConfig(), model(128)) == 1  # the demo model
    assert intra_op_threads(TrainConfig(model="stories260K"), model(64)) == 1
    assert intra_op_threads(TrainConfig(model="gpt2"), model(768)) is None  # torch's default
    assert intra_op_threads(TrainConfig(model="gpt2", threads=3), model(768)) == 3
    assert intra_op_threads(TrainConfig(threads=2), model(128)) == 2


def test_flags_override_yaml_and_yaml_is_1_2(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "rank: 2\nlr: 1e-3  # a float in YAML 1.2 (a string in YAML 1.1)\nrounds: 5\n"
        "local_steps: 1\nclients: 2\ntrain_samples: 24\neval_samples: 8\nbatch_size: 2\n"
    )
    out = tmp_path / "out"
    result = _train("--config", str(config_file), "--rounds", "1", "--rank", "3", "--output", str(out))
    assert result.exit_code == 0, result.output
    saved = read_config_file(out / CONFIG_FILE)
    assert (saved["rank"], saved["rounds"], saved["lr"], saved["clients"]) == (3, 1, 0.001, 2)
    assert len(json.loads((out / METRICS_FILE).read_text())["rounds"]) == 1
    lora_a = [t for name, t in load_file(out / CLIENT_ADAPTER_FILE).items() if "lora_A" in name]
    assert lora_a and all(t.shape[0] == 3 for t in lora_a)  # the flag's rank, not the file's


MODES = {
    "sfl": dict(mode="sfl"),
    "sfl, per-client server adapters": dict(mode="sfl", server_adapter="per_client"),
    "sl": dict(mode="sl"),
    "fl": dict(mode="fl"),
    "centralized": dict(mode="centralized"),
}


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_resume_continues_to_the_same_result_as_an_uninterrupted_run(tmp_path, monkeypatch, mode):
    config = TrainConfig(**TINY, **mode, rounds=3, lora_dropout=0.1)  # dropout: the RNG state must be resumed too
    whole = run_train(config, tmp_path / "whole", progress=False)

    # (a) a finished 2-round run, extended to 3 rounds from the command line
    run_train(config.model_copy(update={"rounds": 2}), tmp_path / "extended", progress=False)
    result = _train("--resume", str(tmp_path / "extended"), "--rounds", "3")
    assert result.exit_code == 0, result.output

    # (b) a 3-round run killed during round 3, resumed as is
    real_run_round = Federation.run_round

    def killed_in_round_3(self, round_index, progress=None):
        if round_index == 2:
            raise KeyboardInterrupt
        return real_run_round(self, round_index, progress)

    monkeypatch.setattr(Federation, "run_round", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(Federation, "run_round", real_run_round)
    interrupted = json.loads((tmp_path / "killed" / METRICS_FILE).read_text())
    assert len(interrupted["rounds"]) == 2 and interrupted["final"] is None
    resume_train(tmp_path / "killed", progress=False)

    for run in ("extended", "killed"):
        for name in (CLIENT_ADAPTER_FILE, SERVER_ADAPTER_FILE, STATE_FILE):
            a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / run / name)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (run, name, key)
        resumed = json.loads((tmp_path / run / METRICS_FILE).read_text())
        assert _without_wall_times(resumed) == _without_wall_times(whole.metrics)
        assert read_config_file(tmp_path / run / CONFIG_FILE) == read_config_file(tmp_path / "whole" / CONFIG_FILE)


def test_run_stopped_in_its_first_round_resumes_from_scratch(tmp_path, monkeypatch):
    config = TrainConfig(**TINY, rounds=1, lora_dropout=0.1)
    whole = run_train(config, tmp_path / "whole", progress=False)

    def killed(self, round_index, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Federation, "run_round", killed)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "killed").iterdir()] == [CONFIG_FILE]
    _assert_clean_error(_train("--output", str(tmp_path / "killed")), "already exists", "--resume")
    result = _train("--resume", str(tmp_path / "killed"))
    assert result.exit_code == 0, result.output
    resumed = json.loads((tmp_path / "killed" / METRICS_FILE).read_text())
    assert _without_wall_times(resumed) == _without_wall_times(whole.metrics)


def test_resume_api_refuses_to_change_the_trajectory(tmp_path):
    run_train(TrainConfig(**TINY, rounds=1), tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="rank cannot change"):
        resume_train(tmp_path / "run", {"rounds": 2, "rank": 8})
    with pytest.raises(ValueError, match="already has 1 rounds"):
        resume_train(tmp_path / "run", {"rounds": 1})
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


BAD_INPUTS = {
    "split layer out of range": (["--split-layer", "4"], ["split_layer", "1..3"]),
    "split layer zero": (["--split-layer", "0"], ["split_layer"]),
    "rank zero": (["--rank", "0"], ["rank"]),
    "fewer samples than clients": (["--clients", "5", "--train-samples", "3"], ["clients", "3 training examples"]),
    "unknown mode": (["--mode", "banana"], ["mode"]),
    "per-client server outside sfl": (["--mode", "fl", "--server-adapter", "per_client"], ["per_client"]),
    "seq_len too short": (["--seq-len", "8"], ["seq_len"]),
    "seq_len beyond the model": (["--seq-len", "4096"], ["seq_len", "128 positions"]),
    "LoRA targets that match nothing": (["--lora-targets", "no_such_proj"], ["lora_targets"]),
    "unknown partition attribute": (["--partition", "dirichlet", "--partition-attribute", "colour"], ["partition"]),
    "generation longer than the model": (["--generate", "--max-new-tokens", "500"], ["max_new_tokens"]),
    "length penalty without beam search": (["--length-penalty", "0.8"], ["length_penalty", "num_beams > 1"]),
    "negative no-repeat n-gram size": (["--no-repeat-ngram-size", "-1"], ["no_repeat_ngram_size"]),
}


@pytest.mark.parametrize("args,needles", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_and_no_output_dir(tmp_path, args, needles):
    out = tmp_path / "out"
    _assert_clean_error(_train(*TINY_FLAGS, *args, "--output", str(out)), *needles)
    assert not out.exists()


def test_bad_files_are_named_and_no_output_dir(tmp_path):
    out = tmp_path / "out"
    missing_data = tmp_path / "missing.csv"
    _assert_clean_error(_train("--data", str(missing_data), "--output", str(out)), "missing.csv")
    missing_model = tmp_path / "no_such_model"
    _assert_clean_error(_train("--model", str(missing_model), "--output", str(out)), "no_such_model")
    _assert_clean_error(_train("--config", str(tmp_path / "nope.yaml"), "--output", str(out)), "nope.yaml")
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("rnak: 4\n")
    _assert_clean_error(_train("--config", str(bad_key), "--output", str(out)), "typo.yaml", "rnak", "unknown field")
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("rank: [4\n")
    _assert_clean_error(_train("--config", str(bad_yaml), "--output", str(out)), "broken.yaml", "invalid YAML")
    assert not out.exists()


def test_unknown_hub_model_is_one_clean_error_line(tmp_path, monkeypatch):
    import logging

    import transformers

    def unreachable_hub(name, *args, **kwargs):  # what huggingface_hub does offline: log, then fail
        logging.getLogger("huggingface_hub.utils._http").warning(f"'no network' thrown while requesting {name}")
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable_hub)
    out = tmp_path / "out"
    _assert_clean_error(_train("--model", "sflllm-test-org/no-such-model", "--output", str(out)),
                        "model 'sflllm-test-org/no-such-model'", "cannot be loaded from the hub")
    assert not out.exists()


def test_eval_data_is_used_without_data(tmp_path, monkeypatch):
    """--eval-data with the synthetic training data: held-out loss and generation use the given file."""
    monkeypatch.setenv("PATH", "")  # no java: METEOR's 10-30 s start-up is left out (tests/test_metrics.py covers it)
    held = tmp_path / "held.jsonl"
    rows = [{"context": f"name[The Vaults], eatType[pub], area[{a}]", "completion": f"The Vaults is a pub in the {a}."}
            for a in ("city centre", "riverside")]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(**TINY, rounds=1, eval_data=str(held), generate=True, max_new_tokens=4)
    result = run_train(config, tmp_path / "out", progress=False)
    assert result.metrics["demo"] is True
    assert (tmp_path / "out" / MRS_FILE).read_text().splitlines() == [r["context"] for r in rows]
    generation = result.metrics["final"]["generation"]
    assert "meteor" not in generation and any("java not found" in note for note in generation["notes"])
    missing = tmp_path / "missing.jsonl"
    _assert_clean_error(_train(*TINY_FLAGS, "--eval-data", str(missing), "--output", str(tmp_path / "x")),
                        "eval_data", "missing.jsonl")
    assert not (tmp_path / "x").exists()


def test_existing_output_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = _train(*TINY_FLAGS, "--rounds", "1", "--output", str(out))
    _assert_clean_error(result, str(out), "other files", "choose another")
    assert "--resume" not in result.output  # it is not a run: suggest another folder, not resuming it
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(TrainConfig(**TINY, rounds=1), out, progress=False)
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a byte of tensor data: the header still parses
    path.write_bytes(bytes(raw))


def _reshape_one_tensor(path: Path) -> None:
    from sflllm.experiments.checkpoint import read_safetensors, write_safetensors_atomic

    tensors, meta = read_safetensors(path)
    name = next(n for n in sorted(tensors) if "lora_A" in n)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    write_safetensors_atomic(path, tensors, meta)


def _rename_one_tensor(path: Path) -> None:
    from sflllm.experiments.checkpoint import read_safetensors, write_safetensors_atomic

    tensors, meta = read_safetensors(path)
    name = sorted(tensors)[0]
    tensors["renamed." + name] = tensors.pop(name)
    write_safetensors_atomic(path, tensors, meta)


def _edit_config_rank(path: Path) -> None:
    path.write_text(path.read_text().replace("rank: 4", "rank: 2"))


CORRUPTIONS = {
    "truncated state": (STATE_FILE, _truncate, "corrupted"),
    "garbled state": (STATE_FILE, _garble, "checksum"),
    "truncated client adapter": (CLIENT_ADAPTER_FILE, _truncate, "corrupted"),
    "garbled server adapter": (SERVER_ADAPTER_FILE, _garble, "checksum"),
    "wrong shape in state": (STATE_FILE, _reshape_one_tensor, "expected"),
    "wrong keys in state": (STATE_FILE, _rename_one_tensor, "unexpected"),
    "wrong shape in client adapter": (CLIENT_ADAPTER_FILE, _reshape_one_tensor, "expected"),
    "config.yaml disagrees with the checkpoint": (CONFIG_FILE, _edit_config_rank, "config mismatch"),
    "state missing": (STATE_FILE, Path.unlink, "not found"),
}


@pytest.mark.parametrize("name,corrupt,needle", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupted_checkpoint_on_resume_names_the_file_and_overwrites_nothing(
    tmp_path, finished_run, name, corrupt, needle
):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    corrupt(run / name)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = _train("--resume", str(run), "--rounds", "2")
    _assert_clean_error(result, str(run / (STATE_FILE if name == CONFIG_FILE else name)), needle)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_cli_rejects_changed_training_flags(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    _assert_clean_error(_train("--resume", str(run), "--rounds", "2", "--rank", "8"), "rank cannot change")
    _assert_clean_error(_train("--resume", str(run), "--output", str(tmp_path / "x")), "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not (tmp_path / "x").exists()


def test_real_pretrained_model_learns_e2e_and_scores_generations(tmp_path, stories260k_dir, e2e_dir):
    out = tmp_path / "stories"
    result = _train(
        "--model", str(stories260k_dir),
        "--data", str(e2e_dir / "devset.csv"),
        "--eval-data", str(e2e_dir / "testset_w_refs.csv"),
        "--train-samples", "96", "--eval-samples", "32", "--seq-len", "160",
        "--clients", "3", "--split-layer", "2", "--rank", "4", "--partition", "dirichlet",
        "--rounds", "2", "--local-steps", "3", "--batch-size", "4", "--lr", "5e-3",
        "--generate", "--generate-samples", "4", "--max-new-tokens", "32", "--threads", "1",
        "--num-beams", "3", "--length-penalty", "0.8", "--no-repeat-ngram-size", "4",
        "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "demo" not in result.output
    assert "Loading weights" not in result.output  # --quiet hides transformers' bars too
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["demo"] is False
    assert metrics["final"]["heldout_loss"] < metrics["initial"]["heldout_loss"]
    generation = metrics["final"]["generation"]
    assert generation["num_hypotheses"] == 4
    assert generation["decoding"] == {
        "num_beams": 3, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "max_new_tokens": 32, "do_sample": False,
    }  # fmt: skip
    for key in ("bleu", "nist", "meteor", "rouge_l", "cider"):
        if key == "meteor" and shutil.which("java") is None:
            continue
        assert math.isfinite(generation[key]) and generation[key] >= 0
    mrs = (out / MRS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(mrs) == 4 and all(mr.startswith("name[") for mr in mrs)
    # the written files, rescored by `sflllm score`, give the numbers in metrics.json
    rescored = runner.invoke(
        app, ["score", "--hyp", str(out / HYPOTHESES_FILE), "--ref", str(out / REFERENCES_FILE), "--json", "--no-meteor"]
    )
    assert rescored.exit_code == 0, rescored.output
    scores = json.loads(rescored.stdout)
    for key in ("bleu", "nist", "rouge_l", "cider"):
        assert scores[key] == pytest.approx(generation[key], rel=1e-12, abs=1e-12)
