"""`--engine flower-sim`: the SFL protocol in Flower's Simulation Engine (sflllm.flower) against `--engine local`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed (pip install 'sflllm[flower]')")

from flwr.app import Array, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sflllm.experiments.config import TrainConfig, TrainInputError, resolve_config  # noqa: E402
from sflllm.experiments.train import resume_train, run_train  # noqa: E402
from sflllm.flower import (  # noqa: E402
    activations_to_records,
    gradients_to_records,
    record_to_tensors,
    records_to_activations,
    records_to_gradients,
    tensors_to_record,
)
from sflllm.flower.records import RAW  # noqa: E402
from sflllm.sfl import CutActivations, CutGradients, CutSpec, check_activations  # noqa: E402

ADAPTER_FILES = ("client_adapter.safetensors", "server_adapter.safetensors", "state.safetensors")


def demo_config(**fields) -> TrainConfig:
    """Tiny demo model, 3 clients, 2 rounds, dropout on (so per-party RNG streams matter)."""
    return TrainConfig(clients=3, rounds=2, local_steps=2, batch_size=4, train_samples=48, eval_samples=8,
                       lora_dropout=0.1, **fields)


def assert_same_run(got_dir, want_dir, got_metrics, want_metrics) -> None:
    for name in ADAPTER_FILES:
        got, want = load_file(got_dir / name), load_file(want_dir / name)
        assert got.keys() == want.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=f"{name}: {key}")
    assert len(got_metrics["rounds"]) == len(want_metrics["rounds"]) == 2
    for got, want in zip(got_metrics["rounds"], want_metrics["rounds"]):
        for field in ("train_loss", "heldout_loss"):
            assert got[field] == pytest.approx(want[field], abs=1e-5), (got["round"], field)


# ------------------------------------------------------------------------- local == flower-sim
@pytest.mark.slow
def test_flower_sim_equals_local_with_a_shared_server_adapter(tmp_path):
    pytest.importorskip("ray", reason="Flower's simulation backend (flwr[simulation]) is not installed")
    local = run_train(demo_config(), tmp_path / "local", progress=False)
    flower = run_train(demo_config(engine="flower-sim"), tmp_path / "flower", progress=False)
    assert_same_run(tmp_path / "flower", tmp_path / "local", flower.metrics, local.metrics)
    assert flower.metrics["rounds"][-1]["train_loss"] < flower.metrics["rounds"][0]["train_loss"]


@pytest.mark.slow
def test_flower_sim_resumes_a_local_run_with_per_client_server_adapters(tmp_path):
    """Round 1 in process, round 2 in Flower (the checkpoint's client states are pushed to the
    ClientApps): the same as two rounds in process."""
    pytest.importorskip("ray", reason="Flower's simulation backend (flwr[simulation]) is not installed")
    config = demo_config(server_adapter="per_client")
    local = run_train(config, tmp_path / "local", progress=False)
    run_train(config.model_copy(update={"rounds": 1}), tmp_path / "mixed", progress=False)
    mixed = resume_train(tmp_path / "mixed", {"rounds": 2, "engine": "flower-sim"}, progress=False)
    assert_same_run(tmp_path / "mixed", tmp_path / "local", mixed.metrics, local.metrics)


@pytest.mark.slow
def test_flower_sim_equals_local_in_float16(tmp_path):
    """A float16 base: the loss scale's fields (found_inf up, loss_scale down) and the adapters'
    found_inf in the client state travel through Flower; the run equals the local engine's."""
    pytest.importorskip("ray", reason="Flower's simulation backend (flwr[simulation]) is not installed")
    local = run_train(demo_config(dtype="float16"), tmp_path / "local", progress=False)
    flower = run_train(demo_config(dtype="float16", engine="flower-sim"), tmp_path / "flower", progress=False)
    assert "loss_scale.scale" in load_file(tmp_path / "local" / "state.safetensors")
    assert_same_run(tmp_path / "flower", tmp_path / "local", flower.metrics, local.metrics)


def test_flower_sim_runs_mode_sfl_only():
    with pytest.raises(TrainInputError, match="engine: 'flower-sim' applies to mode 'sfl' only, not 'fl'"):
        resolve_config({"mode": "fl", "engine": "flower-sim"}, {})


# ------------------------------------------------------------------------- records on the wire
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_tensors_travel_as_raw_bytes_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(3, 4, 5, generator=gen) * 50).to(dtype), "empty": torch.zeros(0, 2, dtype=dtype),
               "scalar": torch.tensor(7, dtype=dtype)}
    record = tensors_to_record(tensors)
    assert all(array.stype == RAW for array in record.values())
    got = record_to_tensors(record, "test")
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


def test_cut_payloads_round_trip():
    labels = torch.full((2, 6), -100, dtype=torch.int64)
    labels[:, 2:] = 3
    cut = CutActivations(torch.randn(2, 6, 8).half(), torch.ones(2, 6, dtype=torch.int64), labels, found_inf=True)
    back = records_to_activations(activations_to_records(cut), "client 0")
    for field in ("hidden", "attention_mask", "labels"):
        assert torch.equal(getattr(back, field), getattr(cut, field))
    assert back.found_inf is True  # float16's loss scale: the client's last step skipped
    grads = CutGradients(torch.randn(2, 6, 8).half(), loss_scale=2.0**15)
    back_grads = records_to_gradients(gradients_to_records(grads))
    assert torch.equal(back_grads.grad, grads.grad) and back_grads.loss_scale == 2.0**15


def raw(dtype: str, shape: tuple[int, ...], nbytes: int, stype: str = RAW) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=b"\x00" * nbytes)


@pytest.mark.parametrize(("array", "message"), [
    (raw("float32", (2, 6, 8), 2 * 6 * 8 * 4 - 4), r"client 0: CutActivations.hidden: 380 bytes for shape \(2, 6, 8\) float32, expected 384"),
    (raw("float32", (2, 6, 8), 2 * 6 * 8 * 4 + 4), "388 bytes"),
    (raw("complex64", (2, 6, 8), 2 * 6 * 8 * 8), "unsupported array .*dtype 'complex64'"),
    (raw("float32", (2, 6, 8), 2 * 6 * 8 * 4, stype="numpy.ndarray"), "unsupported array .*stype 'numpy.ndarray'"),
])
def test_malformed_records_are_rejected_on_arrival(array, message):
    record = tensors_to_record({"attention_mask": torch.ones(2, 6, dtype=torch.int64),
                                "labels": torch.ones(2, 6, dtype=torch.int64)})
    record["hidden"] = array
    with pytest.raises(ValueError, match=message):
        records_to_activations(RecordDict({"cut": record}), "client 0")


def test_payloads_with_missing_fields_or_records_are_rejected():
    record = tensors_to_record({"hidden": torch.zeros(2, 6, 8), "labels": torch.ones(2, 6, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"client 1: CutActivations: fields \['hidden', 'labels'\], expected"):
        records_to_activations(RecordDict({"cut": record}), "client 1")
    with pytest.raises(ValueError, match="main server: CutGradients: message carries no 'grad' record"):
        records_to_gradients(RecordDict())
    with pytest.raises(ValueError, match="expected an ArrayRecord, got str"):
        record_to_tensors("not a record", "adapter")


def test_decoded_payload_of_the_wrong_shape_is_rejected_by_the_main_server():
    """Well-formed bytes of the wrong shape or dtype pass decoding and are stopped by the cut spec."""
    spec = CutSpec(hidden_size=8, dtype=torch.float32, vocab_size=10, batch_size=2, seq_len=6)
    mask, labels = torch.ones(2, 6, dtype=torch.int64), torch.ones(2, 6, dtype=torch.int64)
    for hidden, message in ((torch.zeros(2, 6, 9), r"\(2, 6, 9\)"), (torch.zeros(2, 6, 8).double(), r"\(2, 6, 8\) torch.float64")):
        cut = records_to_activations(activations_to_records(CutActivations(hidden, mask, labels)), "client 2")
        with pytest.raises(ValueError, match=f"client 2: CutActivations.hidden has {message}"):
            check_activations(cut, spec, sender="client 2")


def test_cli_engine_option_is_validated(tmp_path):
    from typer.testing import CliRunner

    from sflllm.cli import app

    result = CliRunner().invoke(app, ["train", "--engine", "flower-sim", "--mode", "fl", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "engine: 'flower-sim' applies to mode 'sfl' only" in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, ["train", "--engine", "grpc", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "engine" in result.output and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_client_rejects_malformed_gradients_across_flower(tmp_path, monkeypatch):
    """The main server (in this process) sends float64 gradients; the ClientApp (a Ray worker) refuses
    them with an error naming the field, which comes back in its reply; nothing is checkpointed."""
    pytest.importorskip("ray", reason="Flower's simulation backend (flwr[simulation]) is not installed")
    import sflllm.flower.simulation as simulation

    real = simulation.main_server_step

    def float64_gradients(*args, **kwargs):
        losses, grads = real(*args, **kwargs)
        return losses, [CutGradients(g.grad.double()) for g in grads]

    monkeypatch.setattr(simulation, "main_server_step", float64_gradients)
    with pytest.raises(RuntimeError, match=r"client 0 failed train.step: .*main server: CutGradients.grad has "
                                           r"\(4, (\d+), 128\) torch.float64, expected \(4, \1, 128\) torch.float32"):
        run_train(demo_config(engine="flower-sim"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "state.safetensors").exists()
