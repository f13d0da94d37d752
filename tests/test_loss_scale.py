"""float16 base weights train with a dynamic loss scale (sflllm.sfl.loss_scale): torch.amp.GradScaler's
semantics across the parties, carried by every runtime, checkpointed; float32 and bfloat16 unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.func import functional_call

import sflllm.sfl.protocol as protocol_mod
from sflllm.data import build_demo_tokenizer, synthetic_examples
from sflllm.experiments.config import TrainConfig
from sflllm.experiments.train import CLIENT_ADAPTER_FILE, STATE_FILE, run_train
from sflllm.model import lm_loss, lora_parameters
from sflllm.sfl import (
    Adapter,
    CutActivations,
    CutGradients,
    CutSpec,
    LossScaler,
    ScaleState,
    check_activations,
    check_gradients,
    main_server_step,
    make_federation,
    split_iteration,
    updated_scale,
)
from sflllm.sfl.federation import Hyper, training
from sflllm.sfl.loss_scale import BACKOFF_FACTOR, GROWTH_FACTOR, GROWTH_INTERVAL, INIT_SCALE
from test_sfl import assert_close, client_data, global_lora, tiny_split
from test_train import TINY

pytestmark = pytest.mark.usefixtures("single_thread")

FP16_ATOL = 2e-3
"""LoRA tensors after a few AdamW steps (lr 1e-2): a float16 base against a float32 one differs by 4.4e-4
(measured); K=1 SFL against centralized and batched against sequential clients, both in float16,
measured 0 on this CPU (the same tolerance covers other kernels' rounding)."""


def fp16_split(dropout: float = 0.0, family: str = "gpt2"):
    """The tests' tiny model with a float16 base and float32 LoRA tensors (as attach_lora on a float16 base)."""
    split = tiny_split(family, len(build_demo_tokenizer()), dropout=dropout)
    split.full.to(torch.float16)
    for p in lora_parameters(split.full).values():
        p.data = p.data.float()
    return split


def federation(dtype=torch.float16, sizes=(7, 9), scaler: LossScaler | None = None, dropout: float = 0.0, **hyper):
    tokenizer = build_demo_tokenizer()
    split = fp16_split(dropout) if dtype == torch.float16 else tiny_split("gpt2", len(tokenizer), dropout=dropout)
    if dtype == torch.bfloat16:
        split.full.to(torch.bfloat16)
        for p in lora_parameters(split.full).values():
            p.data = p.data.float()
    data = client_data(synthetic_examples(40, seed=3), tokenizer, list(sizes))
    fed = make_federation(split, data, Hyper(**{"local_steps": 2, "lr": 1e-2, "seed": 4} | hyper))
    if scaler is not None:
        fed.loss_scaler = scaler
    return fed


def iterate(fed, n: int) -> list[float]:
    """``n`` sfl local iterations of ``fed``; the loss scale each one ran with."""
    scales = []
    with training(fed.split.full):
        for _ in range(n):
            split_iteration(fed.split.client, fed.split.server, fed.clients, fed.servers, fed.server_rng,
                            fed.cut_spec, loss_scaler=fed.loss_scaler)
            scales.append(fed.loss_scaler.scale)
    return scales


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------- the scaler itself
def test_the_defaults_are_torch_gradscalers():
    scaler = torch.amp.GradScaler("cpu")
    assert (INIT_SCALE, GROWTH_FACTOR, BACKOFF_FACTOR, GROWTH_INTERVAL) == (
        scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), max_size=30), st.integers(1, 4))
def test_the_update_backs_off_on_inf_and_grows_after_growth_interval_finite_iterations(found, interval):
    state, scale, finite = ScaleState(), INIT_SCALE, 0
    for inf in found:
        state = updated_scale(state, inf, growth_interval=interval)
        if inf:
            scale, finite = scale * BACKOFF_FACTOR, 0
        else:
            finite += 1
            if finite == interval:
                scale, finite = scale * GROWTH_FACTOR, 0
        assert state == ScaleState(scale, finite)


def test_only_a_float16_base_trains_with_a_loss_scale():
    for dtype in (torch.float32, torch.bfloat16):
        fed = federation(dtype)
        assert fed.loss_scaler is None
        assert not any(n.startswith("loss_scale") or n.endswith("found_inf") for n in fed.state_dict())
    fed = federation(torch.float16)
    assert fed.loss_scaler is not None and fed.loss_scaler.scale == 2.0**16
    keys = fed.state_dict()
    assert {"loss_scale.scale", "loss_scale.growth_tracker", "loss_scale.due",
            "client.0.found_inf", "client.1.found_inf", "server.0.found_inf"} <= set(keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bfloat16_train_exactly_as_without_loss_scaling(monkeypatch, dtype):
    """The adapter's step with no scaler is the plain AdamW step of before (bit for bit), and every
    payload says so (loss_scale 1.0, found_inf False)."""
    want = federation(dtype)

    def plain_step(self, loss_scale=1.0):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    with monkeypatch.context() as m:
        m.setattr(Adapter, "step", plain_step)
        for r in range(2):
            want.run_round(r)
    sent: list[CutActivations | CutGradients] = []
    real = protocol_mod.main_server_step

    def spy(*args, **kwargs):
        losses, grads = real(*args, **kwargs)
        sent.extend([*args[3], *grads])
        return losses, grads

    monkeypatch.setattr(protocol_mod, "main_server_step", spy)
    got = federation(dtype)
    for r in range(2):
        got.run_round(r)
    assert_equal_states(got.state_dict(), want.state_dict())
    assert len(sent) == 2 * 2 * 2 * 2
    assert all(p.found_inf is False for p in sent if isinstance(p, CutActivations))
    assert all(p.loss_scale == 1.0 for p in sent if isinstance(p, CutGradients))


# ------------------------------------------------------------------------- float16 training
def test_float16_trains_the_loss_decreases_and_every_payload_carries_the_scale(monkeypatch):
    sent: list[CutGradients] = []
    real = protocol_mod.main_server_step

    def spy(*args, **kwargs):
        losses, grads = real(*args, **kwargs)
        sent.extend(grads)
        return losses, grads

    monkeypatch.setattr(protocol_mod, "main_server_step", spy)
    fed = federation()
    assert fed.cut_spec.dtype == torch.float16
    losses = [fed.run_round(r)["train_loss"] for r in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.isfinite(t).all() for t in fed.state_dict().values())
    assert all(g.grad.dtype == torch.float16 and g.loss_scale == 2.0**16 for g in sent)
    # the scaled activation gradients keep values that float16 would flush to zero unscaled
    tiny = [g for g in sent if ((g.grad.float().abs() / g.loss_scale) < 2.0**-24).logical_and(g.grad != 0).any()]
    assert tiny, "no activation gradient below float16's smallest subnormal: the scale would not matter"


def test_float16_with_the_scale_stays_close_to_a_float32_base():
    """The same run (2 clients, 3 rounds) with a float16 base and loss scaling and with a float32 base:
    the float32 LoRA tensors agree to float16 tolerance (and do differ, so it is not vacuous)."""
    results = {}
    for dtype in (torch.float16, torch.float32):
        fed = federation(dtype)
        initial = global_lora(fed.split)
        for r in range(3):
            fed.run_round(r)
        fed.load_global_adapter()
        results[dtype] = global_lora(fed.split)
    assert max(float((results[torch.float32][n] - initial[n]).abs().max()) for n in initial) > 1e-2
    assert_close(results[torch.float16], results[torch.float32], atol=FP16_ATOL)
    assert any(not torch.equal(results[torch.float16][n], results[torch.float32][n]) for n in initial)


def test_centralized_float16_equals_torch_gradscaler_driving_both_optimizers():
    """Centralized LoRA (one model, the client part's and the server part's AdamW) against a plain loop
    with torch.amp.GradScaler: an initial scale of 2**24 overflows float16 for several iterations
    (steps skipped, scale halved), then it grows every 3 finite iterations: the same scales, the same
    adapters, bit for bit."""
    settings_ = {"init_scale": 2.0**24, "growth_interval": 3}
    ours = federation(sizes=(16,), scaler=LossScaler(**settings_), mode="centralized", local_steps=12, batch_size=2)
    ours.run_round(0)

    ref = federation(sizes=(16,), scaler=LossScaler(), mode="centralized", batch_size=2)
    scaler = torch.amp.GradScaler("cpu", **settings_)
    client, adapters = ref.clients[0], [ref.clients[0].adapter, ref.servers[0]]
    scales = []
    with training(ref.split.full):
        for _ in range(12):
            scales.append(scaler.get_scale())
            batch = client.next_batch()
            with client.rng.active():
                out = functional_call(ref.split.full, ref.full_model_lora(*adapters), (),
                                      {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
            scaler.scale(lm_loss(out.logits, batch.labels)).backward()
            for adapter in adapters:
                scaler.step(adapter.optimizer)
                adapter.optimizer.zero_grad(set_to_none=True)
            scaler.update()
    assert scales[0] == 2.0**24 and min(scales) < 2.0**21 and scales[-1] > min(scales)  # backed off, then grew
    assert ours.loss_scaler.scale == scales[-1]
    got, want = ours.state_dict(), ref.state_dict()
    assert any(int(got[n]) < 12 for n in got if n.endswith(".step"))  # steps were skipped
    for name in want:
        if not name.startswith("loss_scale") and not name.endswith("found_inf"):
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("party", ["client 0", "server"])
def test_a_party_that_overflows_skips_its_step_the_others_step_and_the_scale_backs_off(party):
    """An inf injected into one party's gradient in iteration 1: that party skips its AdamW step (its
    tensors and step count unchanged), every other party steps exactly as without the inf, and the
    main server halves S before iteration 2 (the client's report travels on its next activations)."""
    fed, reference = federation(), federation()
    adapter = fed.clients[0].adapter if party == "client 0" else fed.servers[0]
    before = {n: t.detach().clone() for n, t in adapter.tensors.items()}
    fired = []

    def inject(grad):
        fired.append(True)
        return grad * float("inf") if len(fired) == 1 else grad

    next(iter(adapter.tensors.values())).register_hook(inject)
    assert iterate(fed, 1) == iterate(reference, 1) == [2.0**16]
    assert adapter.found_inf and all(torch.equal(t, before[n]) for n, t in adapter.tensors.items())
    got, want = fed.state_dict(), reference.state_dict()
    prefix = "client.0." if party == "client 0" else "server.0."
    assert int(got[f"{prefix}adamw.{next(iter(before))}.step"]) == 0
    for name in want:
        if not name.startswith(prefix) and not name.endswith("found_inf"):
            assert torch.equal(got[name], want[name]), name  # the others stepped as without the inf
    assert fed.loss_scaler.scale == 2.0**16 and fed.loss_scaler.due
    assert iterate(fed, 1) == [2.0**15] and iterate(reference, 1) == [2.0**16]
    assert not adapter.found_inf and int(fed.state_dict()[f"{prefix}adamw.{next(iter(before))}.step"]) == 1


def test_the_scale_grows_after_growth_interval_finite_iterations():
    fed = federation(scaler=LossScaler(growth_interval=3))
    assert iterate(fed, 7) == [2.0**16] * 3 + [2.0**17] * 3 + [2.0**18]


@pytest.mark.parametrize("mode", ["sfl", "centralized", "fl", "sl"])
def test_every_mode_trains_in_float16_with_the_scale(mode):
    """Forced overflows (initial scale 2**24): steps are skipped, S backs off, and every mode still learns."""
    fed = federation(sizes=(7, 9), scaler=LossScaler(init_scale=2.0**24), mode=mode, local_steps=4)
    losses = [fed.run_round(r)["train_loss"] for r in range(4)]
    state = fed.state_dict()
    assert state["loss_scale.scale"].item() < 2.0**24 and state["loss_scale.due"].item() == 1
    iterations = 4 * 4 * (2 if mode == "sl" else 1)  # sl relays the adapter through the 2 clients
    assert min(int(v) for n, v in state.items() if n.endswith(".step")) < iterations  # some steps were skipped
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert losses[-1] < losses[0], losses


def test_sfl_single_client_equals_centralized_in_float16():
    """K=1 with overflows (initial scale 2**24, growth every 2 iterations): SFL and centralized see the
    same scales and skip the same steps, and end with the same adapters to float16 tolerance."""
    results, scales = {}, {}
    for mode in ("sfl", "centralized"):
        fed = federation(sizes=(13,), scaler=LossScaler(init_scale=2.0**24, growth_interval=2), mode=mode,
                         local_steps=5)
        initial = global_lora(fed.split)
        for r in range(2):
            fed.run_round(r)
        fed.load_global_adapter()
        results[mode], scales[mode] = global_lora(fed.split), fed.loss_scaler.state_dict()
        steps = [int(v) for n, v in fed.state_dict().items() if n.endswith(".step")]
        assert 0 < min(steps) < 10  # some steps were skipped
    assert_equal_states(scales["sfl"], scales["centralized"])
    assert max(float((results["sfl"][n] - initial[n]).abs().max()) for n in initial) > 1e-2
    assert_close(results["sfl"], results["centralized"], atol=FP16_ATOL)


def test_batched_clients_equal_sequential_ones_in_float16():
    runs = {}
    for batching in ("sequential", "batched"):
        fed = federation(sizes=(7, 9, 8), scaler=LossScaler(init_scale=2.0**30, growth_interval=2),
                         client_batching=batching)
        for r in range(3):
            fed.run_round(r)
        runs[batching] = fed.state_dict()
    for name, want in runs["sequential"].items():
        torch.testing.assert_close(runs["batched"][name], want, rtol=0, atol=FP16_ATOL, msg=name)


# ------------------------------------------------------------------------- other runtimes
def test_the_data_plane_equals_the_in_process_engine_in_float16():
    """Every cut exchange over gRPC/TLS (found_inf up, loss_scale down, through safetensors bytes), with
    overflows (initial scale 2**24): the same state as in process, bit for bit."""
    pytest.importorskip("grpc", reason="grpcio comes with the flower extra")
    pytest.importorskip("cryptography", reason="cryptography comes with the flower extra")
    from sflllm.deploy import DataPlaneRehearsal

    scaler = {"init_scale": 2.0**24, "growth_interval": 2}
    reference = federation(sizes=(7, 9, 8), scaler=LossScaler(**scaler), dropout=0.1, local_steps=3)
    for r in range(2):
        reference.run_round(r)
    engine = DataPlaneRehearsal(federation(sizes=(7, 9, 8), scaler=LossScaler(**scaler), dropout=0.1, local_steps=3))
    try:
        for r in range(2):
            assert engine.run_round(r)["dropped"] == {}
    finally:
        engine.close()
    want = reference.state_dict()
    assert want["loss_scale.scale"].item() < 2.0**24
    assert_equal_states(engine.state_dict(), want)


# ------------------------------------------------------------------------- the payloads' new fields
SPEC16 = CutSpec(hidden_size=4, dtype=torch.float16, vocab_size=10)
SPEC32 = CutSpec(hidden_size=4, dtype=torch.float32, vocab_size=10)


def cut(dtype, found_inf=False):
    ones = torch.ones(2, 3, dtype=torch.int64)
    return CutActivations(torch.zeros(2, 3, 4, dtype=dtype), ones, ones, found_inf)


def test_the_new_fields_are_checked_on_receipt():
    assert check_activations(cut(torch.float16, True), SPEC16).found_inf
    with pytest.raises(ValueError, match=r"client: CutActivations.found_inf is True, expected a bool, False for a torch.float32"):
        check_activations(cut(torch.float32, True), SPEC32)
    with pytest.raises(ValueError, match="CutActivations.found_inf is 1, expected a bool"):
        check_activations(cut(torch.float16, 1), SPEC16)
    sent = torch.zeros(2, 3, 4, dtype=torch.float16)
    assert check_gradients(CutGradients(sent, 2.0**20), sent).loss_scale == 2.0**20
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, 4):
        with pytest.raises(ValueError, match="main server: CutGradients.loss_scale is .*, expected a finite float > 0"):
            check_gradients(CutGradients(sent, bad), sent)
    with pytest.raises(ValueError, match=r"loss_scale is 2.0, .* 1.0 for a torch.float32 cut"):
        check_gradients(CutGradients(sent.float(), 2.0), sent.float())


def test_the_wire_form_carries_the_fields_and_refuses_malformed_ones():
    payload = cut(torch.float16, True)
    back = CutActivations.from_tensors(payload.to_tensors(), "client 0")
    assert back.found_inf is True and torch.equal(back.hidden, payload.hidden)
    grads = CutGradients(torch.ones(2, 3, 4, dtype=torch.float16), 2.0**15)
    assert CutGradients.from_tensors(grads.to_tensors(), "main server").loss_scale == 2.0**15
    with pytest.raises(ValueError, match=r"client 0.found_inf has \(1,\) torch.int64, expected one torch.uint8 0 or 1"):
        CutActivations.from_tensors(payload.to_tensors() | {"found_inf": torch.tensor([1])}, "client 0")
    with pytest.raises(ValueError, match=r"ms.loss_scale has \(\) torch.float64, expected one torch.float64"):
        CutGradients.from_tensors(grads.to_tensors() | {"loss_scale": torch.tensor(2.0, dtype=torch.float64)}, "ms")
    with pytest.raises(ValueError, match=r"ms: fields \['grad'\], expected \['grad', 'loss_scale'\]"):
        CutGradients.from_tensors({"grad": grads.grad}, "ms")


def test_a_float16_main_server_without_a_scaler_is_refused():
    fed = federation()
    with pytest.raises(ValueError, match="a torch.float16 cut needs a loss_scaler"):
        main_server_step(fed.split.server, fed.servers, fed.server_rng, [], fed.cut_spec)
    fed32 = federation(torch.float32)
    with pytest.raises(ValueError, match="a torch.float32 cut needs no loss_scaler"):
        main_server_step(fed32.split.server, fed32.servers, fed32.server_rng, [], fed32.cut_spec,
                         loss_scaler=LossScaler())


# ------------------------------------------------------------------------- checkpoints
def test_a_float16_state_resumes_bit_identically_and_an_incomplete_or_impossible_one_is_refused():
    scaler = {"init_scale": 2.0**30, "growth_interval": 2}
    whole = federation(scaler=LossScaler(**scaler))
    for r in range(3):
        whole.run_round(r)
    part = federation(scaler=LossScaler(**scaler))
    part.run_round(0)
    saved = part.state_dict()
    assert saved["loss_scale.scale"].item() < 2.0**30  # it backed off in round 0
    resumed = federation(scaler=LossScaler(**scaler))
    resumed.load_state_dict(saved)
    for r in (1, 2):
        resumed.run_round(r)
    assert_equal_states(resumed.state_dict(), whole.state_dict())

    fresh = federation().state_dict()
    refused = {
        "missing key 'loss_scale.due'": {k: v for k, v in saved.items() if k != "loss_scale.due"},
        "'loss_scale.scale': -4.0 is not a finite number > 0": saved | {"loss_scale.scale": torch.tensor([-4.0])},
        "'loss_scale.growth_tracker': 2000 outside 0..1999": saved | {"loss_scale.growth_tracker": torch.tensor([2000])},
        "'client.1.found_inf': 0.5 is not 0 or 1": saved | {"client.1.found_inf": torch.tensor([0.5])},
    }
    target = federation()
    for message, state in refused.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            target.load_state_dict(state)
        assert_equal_states(target.state_dict(), fresh)  # nothing changed
    with pytest.raises(ValueError, match="federation state has unexpected key 'client.0.found_inf'"):
        federation(torch.float32).load_state_dict(federation(torch.float32).state_dict() | {
            k: v for k, v in saved.items() if "found_inf" in k or k.startswith("loss_scale")})


def test_train_in_float16_resumes_bit_identically(tmp_path):
    config = TrainConfig(**TINY, rounds=2, dtype="float16", generate=False)
    run_train(config, tmp_path / "whole", progress=False)
    run_train(config.model_copy(update={"rounds": 1}), tmp_path / "part", progress=False)
    from sflllm.experiments.train import resume_train

    resume_train(tmp_path / "part", {"rounds": 2}, progress=False)
    for name in (CLIENT_ADAPTER_FILE, STATE_FILE):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "part" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "loss_scale.scale" in load_file(tmp_path / "whole" / STATE_FILE)
