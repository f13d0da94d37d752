"""Where and in which precision a run trains: --device (tested on the CPU: cpu, auto, an absent cuda)
and --dtype (bfloat16 base weights: split == unsplit, SFL K=1 == centralized, real learning), resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sflllm.cost.profile import activation_bits
from sflllm.data import build_demo_tokenizer, synthetic_examples
from sflllm.experiments.config import TrainConfig
from sflllm.experiments.train import CLIENT_ADAPTER_FILE, METRICS_FILE, STATE_FILE, resume_train, run_train
from sflllm.model import (
    attach_lora,
    load_pretrained,
    lora_parameters,
    model_device,
    resolve_device,
    resolve_dtype,
    split_model,
)
from sflllm.sfl import Hyper, PartyRng, make_federation
from test_model_split import padded_batch, tiny_model, with_random_lora
from test_sfl import assert_close, client_data, global_lora, tiny_split
from test_train import TINY, _assert_clean_error, _train

pytestmark = pytest.mark.usefixtures("single_thread")

BF16_ATOL = 0.05  # bfloat16 keeps 8 significant bits: ~4e-3 relative per rounding, a few roundings deep

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------- devices
def test_cpu_and_auto_resolve_to_a_present_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif torch.backends.mps.is_available():
        assert auto.type == "mps"
    else:
        assert auto == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_cuda_is_a_one_line_error(tmp_path, name):
    with pytest.raises(ValueError, match=f"'{name}': no CUDA device is available"):
        resolve_device(name)
    out = tmp_path / "out"
    _assert_clean_error(_train("--device", name, "--output", str(out)), "device", name, "no CUDA device")
    assert not out.exists()


def test_batched_clients_with_dropout_is_a_one_line_error(tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(_train("--client-batching", "batched", "--lora-dropout", "0.1", "--output", str(out)),
                        "client_batching='batched' needs a client part without dropout")
    assert not out.exists()


def test_a_device_that_is_not_one_is_named(tmp_path):
    _assert_clean_error(_train("--device", "gpu", "--output", str(tmp_path / "out")), "device")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("cuda:x")


def test_party_streams_on_the_cpu_draw_nothing_extra():
    """On the CPU a party's stream is torch's CPU stream itself (no seed drawn for a device generator)."""
    rng = PartyRng(3, "client.0", "cpu")
    state = rng.state.clone()
    with rng.active():
        torch.rand(1)
    replay = torch.Generator().set_state(state)
    assert torch.equal(rng.state, (torch.rand(1, generator=replay), replay.get_state())[1])


def test_device_cpu_then_resume_with_auto_continues_the_run(tmp_path):
    """A run trained with --device cpu resumes with --device auto (device may change on resume); the
    checkpoints hold CPU tensors, and the result is the uninterrupted run's."""
    config = TrainConfig(**TINY, rounds=2, lora_dropout=0.1, device="cpu")
    whole = run_train(config, tmp_path / "whole", progress=False)
    run_train(config.model_copy(update={"rounds": 1}), tmp_path / "part", progress=False)
    result = _train("--resume", str(tmp_path / "part"), "--rounds", "2", "--device", "auto")
    assert result.exit_code == 0, result.output
    assert "on cpu (auto)" in result.output
    for name in (CLIENT_ADAPTER_FILE, STATE_FILE):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "part" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    rounds = json.loads((tmp_path / "part" / METRICS_FILE).read_text())["rounds"]
    assert [r["heldout_loss"] for r in rounds] == [r["heldout_loss"] for r in whole.metrics["rounds"]]


# ------------------------------------------------------------------------- dtypes
def test_resume_in_another_dtype_is_refused(tmp_path):
    run_train(TrainConfig(**TINY, rounds=1), tmp_path / "run", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="dtype cannot change when resuming"):
        resume_train(tmp_path / "run", {"rounds": 2, "dtype": "bfloat16"})
    _assert_clean_error(_train("--resume", str(tmp_path / "run"), "--rounds", "2", "--dtype", "bfloat16"),
                        "dtype cannot change")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_activation_bits_follow_the_dtype():
    assert [activation_bits(d) for d in ("float32", "bfloat16", "float16")] == [32, 16, 16]
    with pytest.raises(ValueError, match="dtype must be one of"):
        activation_bits("int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float64")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bfloat16_split_equals_unsplit_and_lora_stays_float32(model_type):
    model = with_random_lora(tiny_model(model_type).to(torch.bfloat16))
    assert {p.dtype for p in lora_parameters(model).values()} == {torch.float32}
    input_ids, mask = padded_batch(model.config.vocab_size, "right")
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=mask).logits
        reference = with_random_lora(tiny_model(model_type))(input_ids=input_ids, attention_mask=mask).logits
        for split_layer in (1, 3):
            split = split_model(model, split_layer)
            hidden = split.client(input_ids, mask)
            assert hidden.dtype == torch.bfloat16  # the cut tensors take the base dtype
            torch.testing.assert_close(split.server(hidden, mask), want, rtol=0, atol=BF16_ATOL)
    # and bfloat16 is close to float32, so the tolerance above is not vacuous
    assert float((want.float() - reference).abs().max()) < 0.5
    assert float((want.float() - reference).abs().max()) > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_sfl_single_client_equals_centralized(family):
    tokenizer = build_demo_tokenizer()
    data = client_data(synthetic_examples(40, seed=3), tokenizer, [13])
    results = {}
    for mode in ("sfl", "centralized"):
        split = tiny_split(family, len(tokenizer))
        split.full.to(torch.bfloat16)
        for p in lora_parameters(split.full).values():  # as attach_lora on a bfloat16 base leaves them
            p.data = p.data.float()
        fed = make_federation(split, data, Hyper(mode=mode, local_steps=2, lr=1e-2))
        assert fed.cut_spec.dtype == torch.bfloat16
        initial = global_lora(split)
        for r in range(3):
            fed.run_round(r)
        fed.load_global_adapter()
        results[mode] = global_lora(split)
    assert max(float((results["sfl"][n] - initial[n]).abs().max()) for n in initial) > 1e-2
    assert_close(results["sfl"], results["centralized"], atol=2e-3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stories260k_learns(stories260k_dir, e2e_dir, tmp_path, dtype):
    """The real pretrained model with bfloat16 (or float16, with its loss scale) base weights: SFL over
    3 clients lowers the held-out loss."""
    config = TrainConfig(model=str(stories260k_dir), data=str(e2e_dir / "devset.csv"), dtype=dtype,
                         clients=3, rounds=3, local_steps=3, batch_size=4, train_samples=120, eval_samples=24,
                         seq_len=192, lr=5e-3, rank=8, split_layer=2)
    metrics = run_train(config, tmp_path / "run", progress=False).metrics
    assert metrics["rounds"][-1]["heldout_loss"] < metrics["initial"]["heldout_loss"] - 0.05


def test_attach_lora_on_a_bfloat16_base_keeps_lora_in_float32_on_its_device(stories260k_dir):
    model, _ = load_pretrained(str(stories260k_dir))
    peft_model = attach_lora(model.to(torch.bfloat16), 4, 8.0, 0.0)
    assert {p.dtype for p in lora_parameters(peft_model).values()} == {torch.float32}
    assert model_device(peft_model) == torch.device("cpu")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert peft_model(input_ids=input_ids).logits.dtype == torch.bfloat16


class FakeAccelerator:
    """Stands in for ``torch.mps`` (no accelerator here): records the seeds its generator is given."""

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.state = torch.tensor([7], dtype=torch.uint8)

    def manual_seed(self, seed: int) -> None:
        self.seeds.append(seed)
        self.state = torch.tensor([seed % 256], dtype=torch.uint8)

    def get_rng_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.state = state.clone()


def test_accelerator_streams_are_seeded_from_the_party_cpu_state(monkeypatch):
    """On an accelerator, entering a party's stream seeds the device generator from the party's CPU state
    (one draw): replaying the saved state gives the same seed, other parties other seeds, and the
    device generator of the caller is restored."""
    fake = FakeAccelerator()
    monkeypatch.setattr(torch, "get_device_module", lambda kind: fake)
    client0, client1 = PartyRng(5, "client.0", "mps"), PartyRng(5, "client.0", "mps")
    before = client0.state.clone()
    with client0.active():
        pass
    with client0.active():
        pass
    with client1.active():
        pass
    assert fake.seeds[0] == fake.seeds[2] != fake.seeds[1]  # same party and state: same seed; next entry: new
    assert fake.state.tolist() == [7]  # the caller's device stream is back
    replay = torch.Generator().set_state(before)
    torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=replay)
    torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=replay)
    assert torch.equal(client0.state, replay.get_state())  # exactly one CPU draw per entry
    other = PartyRng(5, "client.1", "mps")
    with other.active():
        pass
    assert fake.seeds[-1] not in fake.seeds[:3]
