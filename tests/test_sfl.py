"""The SFL protocol (spec §1) and its baselines on small random-init models and the synthetic E2E data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sflllm.data import synthetic_examples, tokenize
from sflllm.model import attach_lora, build_demo_model, lora_parameters, split_model
from sflllm.sfl import Federation, Hyper, fedavg, make_federation
from sflllm.sfl.client import Cursor, epoch_order, next_indices
from sflllm.sfl.main_server import received, server_losses
from sflllm.sfl.messages import CutActivations

SEQ_LEN = 96


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def examples():
    return synthetic_examples(60, seed=3)


def client_data(examples, tokenizer, sizes, offset=0):
    """Consecutive slices of the synthetic pool, one per client, of the given (unequal) sizes."""
    starts = np.cumsum([offset, *sizes])
    return [tokenize(examples[a:b], tokenizer, SEQ_LEN) for a, b in zip(starts[:-1], starts[1:])]


def tiny_split(family: str, vocab_size: int, *, split_layer: int = 1, dropout: float = 0.0):
    """A 3-block random-init model of the family with rank-4 LoRA, cut after ``split_layer``."""
    if family == "gpt2":
        model = build_demo_model(vocab_size, seed=0, num_layers=3, hidden_size=32, num_heads=2, dropout=dropout)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
    return split_model(attach_lora(model, rank=4, alpha=8, dropout=dropout, seed=1), split_layer)


def global_lora(split) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in lora_parameters(split.full).items()}


def train(family, vocab_size, data, hyper, rounds, **split_kw) -> tuple[Federation, dict[str, torch.Tensor]]:
    split = tiny_split(family, vocab_size, **split_kw)
    federation = make_federation(split, data, hyper)
    for r in range(rounds):
        federation.run_round(r)
    federation.load_global_adapter()
    return federation, global_lora(split)


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def max_change(after: dict, before: dict) -> float:
    return max(float((after[n] - before[n]).abs().max()) for n in after)


# ------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("local_steps", [1, 3])
def test_sfl_single_client_equals_centralized_lora(family, local_steps, examples, tokenizer):
    """K=1: the cut (detached activations, returned gradient, separate AdamWs) changes nothing."""
    data = client_data(examples, tokenizer, [13])
    initial = global_lora(tiny_split(family, len(tokenizer)))
    _, sfl = train(family, len(tokenizer), data, Hyper(mode="sfl", local_steps=local_steps, lr=1e-2), 4)
    _, central = train(family, len(tokenizer), data, Hyper(mode="centralized", local_steps=local_steps, lr=1e-2), 4)
    assert max_change(sfl, initial) > 1e-2  # it did train
    assert_close(sfl, central, atol=1e-5)


@pytest.mark.parametrize("mode", ["fl", "sl"])
def test_fl_and_sl_single_client_equal_centralized(mode, examples, tokenizer):
    data = client_data(examples, tokenizer, [13])
    _, got = train("gpt2", len(tokenizer), data, Hyper(mode=mode, local_steps=2, lr=1e-2), 3)
    _, central = train("gpt2", len(tokenizer), data, Hyper(mode="centralized", local_steps=2, lr=1e-2), 3)
    assert_close(got, central, atol=1e-5)


def test_fl_local_training_is_independent_centralized_training(examples, tokenizer):
    """In fl, client 0's pre-aggregation adapter is what centralized LoRA on its data alone gives."""
    data = client_data(examples, tokenizer, [9, 11])
    hyper = Hyper(mode="fl", local_steps=3, lr=1e-2)
    fl = make_federation(tiny_split("gpt2", len(tokenizer)), data, hyper)
    fl.local_iterations()
    alone = make_federation(tiny_split("gpt2", len(tokenizer)), data[:1],
                            Hyper(mode="centralized", local_steps=3, lr=1e-2))
    alone.local_iterations()
    for got, want in ((fl.clients[0].adapter, alone.clients[0].adapter), (fl.servers[0], alone.servers[0])):
        assert_close(got.tensors, want.tensors, atol=1e-6)


def test_concatenated_server_batch_equals_per_client_passes(examples, tokenizer):
    data = client_data(examples, tokenizer, [4, 4, 4])
    split = tiny_split("llama", len(tokenizer), split_layer=2)
    with torch.no_grad():
        cuts = [CutActivations(split.client(d.input_ids, d.attention_mask), d.attention_mask, d.labels) for d in data]
    acts = received(cuts)
    server_lora = lora_parameters(split.server)
    together = server_losses(split.server, server_lora, acts, cuts)
    grads_together = torch.autograd.grad(together.sum(), acts)
    apart = [server_losses(split.server, server_lora, [a], [c])[0] for a, c in zip(acts, cuts)]
    torch.testing.assert_close(together, torch.stack(apart), atol=1e-6, rtol=0)
    for k, (loss, act) in enumerate(zip(apart, acts)):  # client k gets the gradient of its own loss
        (own,) = torch.autograd.grad(loss, act)
        torch.testing.assert_close(grads_together[k], own, atol=1e-7, rtol=1e-5, msg=f"client {k}")


# ------------------------------------------------------------------------- federated server
@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 1000), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_fedavg_is_the_data_size_weighted_mean(sizes, seed):
    rng = np.random.default_rng(seed)
    weights = [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(5,))} for _ in sizes]
    got = fedavg([{n: torch.tensor(w, dtype=torch.float64) for n, w in ws.items()} for ws in weights], sizes)
    share = np.asarray(sizes, dtype=float) / sum(sizes)
    for name in ("a", "b"):
        want = np.tensordot(share, np.stack([w[name] for w in weights]), axes=1)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-12, atol=1e-12)


def test_fedavg_rejects_bad_inputs():
    a = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="one data size per adapter"):
        fedavg([a, a], [1])
    with pytest.raises(ValueError, match="positive"):
        fedavg([a, a], [1, 0])
    with pytest.raises(ValueError, match="adapter 1"):
        fedavg([a, {"v": torch.ones(2)}], [1, 1])


@pytest.mark.parametrize("server_adapter", ["shared", "per_client"])
def test_round_aggregates_with_local_data_sizes(server_adapter, examples, tokenizer):
    sizes = [5, 17, 9]
    data = client_data(examples, tokenizer, sizes)
    fed = make_federation(tiny_split("gpt2", len(tokenizer)), data,
                          Hyper(local_steps=2, lr=1e-2, server_adapter=server_adapter))
    fed.local_iterations()
    clients = [{n: t.detach().clone() for n, t in a.tensors.items()} for a in fed.client_adapters]
    servers = [{n: t.detach().clone() for n, t in a.tensors.items()} for a in fed.servers]
    assert max_change(clients[0], clients[1]) > 1e-4  # clients diverged locally
    fed.aggregate()
    assert fed.data_sizes == sizes
    for adapter in fed.client_adapters:
        assert_close(adapter.tensors, fedavg(clients, sizes), atol=1e-7)
    want_servers = fedavg(servers, sizes) if server_adapter == "per_client" else servers[0]
    assert len(fed.servers) == (3 if server_adapter == "per_client" else 1)
    for adapter in fed.servers:
        assert_close(adapter.tensors, want_servers, atol=1e-7)


@pytest.mark.parametrize(("server_adapter", "local_steps"), [("shared", 1), ("per_client", 3)])
def test_client_isolation_before_aggregation(server_adapter, local_steps, examples, tokenizer):
    """Changing client 1's data changes only client 1's adapters before FedAvg.

    With one shared server adapter this holds for the first iteration only (from the second on the
    server adapter, hence every client's returned gradient, depends on all clients' data); with
    per-client server adapters it holds for the whole round.
    """
    hyper = Hyper(local_steps=local_steps, lr=1e-2, server_adapter=server_adapter)
    runs = []
    for replaced in (client_data(examples, tokenizer, [8]), client_data(examples, tokenizer, [8], offset=40)):
        data = client_data(examples, tokenizer, [8, 8, 8])
        data[1] = replaced[0]
        fed = make_federation(tiny_split("gpt2", len(tokenizer)), data, hyper)
        fed.local_iterations()
        runs.append(fed)
    base, changed = runs
    for k in range(3):
        same = [torch.equal(base.clients[k].adapter.tensors[n], t) for n, t in changed.clients[k].adapter.tensors.items()]
        assert all(same) == (k != 1), f"client {k}"
    if server_adapter == "per_client":
        for k in range(3):
            same = [torch.equal(base.servers[k].tensors[n], t) for n, t in changed.servers[k].tensors.items()]
            assert all(same) == (k != 1), f"server adapter {k}"


def test_per_client_server_adapters_with_one_client_equal_shared(examples, tokenizer):
    data = client_data(examples, tokenizer, [11])
    _, per_client = train("gpt2", len(tokenizer), data, Hyper(local_steps=2, lr=1e-2, server_adapter="per_client"), 3)
    _, shared = train("gpt2", len(tokenizer), data, Hyper(local_steps=2, lr=1e-2), 3)
    assert_close(per_client, shared, atol=0)


# ------------------------------------------------------------------------- all modes: learning, samples
@pytest.mark.parametrize(("mode", "server_adapter"),
                         [("sfl", "shared"), ("sfl", "per_client"), ("centralized", "shared"),
                          ("fl", "shared"), ("sl", "shared")])
def test_every_mode_learns_and_counts_samples(mode, server_adapter, examples, tokenizer):
    data = client_data(examples, tokenizer, [10, 10, 10])
    hyper = Hyper(mode=mode, local_steps=3, batch_size=4, lr=2e-2, server_adapter=server_adapter)
    fed = make_federation(tiny_split("gpt2", len(tokenizer)), data, hyper)
    calls = []
    stats = [fed.run_round(r, progress=lambda done, total: calls.append((done, total))) for r in range(6)]
    assert all(s["samples"] == 3 * 3 * 4 for s in stats)
    assert calls[-1][0] == calls[-1][1] and len(calls) == 6 * calls[-1][1]
    assert stats[-1]["train_loss"] < stats[0]["train_loss"] - 0.25  # observed 0.39-0.44 (random-init base)
    assert all(math.isfinite(s["train_loss"]) for s in stats)


def test_sl_relays_one_adapter_through_the_clients(examples, tokenizer):
    data = client_data(examples, tokenizer, [6, 6])
    fed = make_federation(tiny_split("gpt2", len(tokenizer)), data, Hyper(mode="sl", local_steps=2))
    assert len(fed.client_adapters) == 1 and len(fed.servers) == 1
    before = {n: t.detach().clone() for n, t in fed.client_adapters[0].tensors.items()}
    stats = fed.run_round(0)
    assert stats["samples"] == 2 * 2 * 4
    name = next(iter(before))
    assert int(fed.state_dict()[f"client.0.adamw.{name}.step"]) == 4  # 2 clients x 2 iterations, one adapter
    assert not torch.equal(fed.client_adapters[0].tensors[name], before[name])
    assert [c.cursor for c in fed.clients] == [Cursor(1, 2), Cursor(1, 2)]  # 2 x 4 rows of 6 each


def test_training_leaves_the_callers_rng_and_model_mode_alone(examples, tokenizer):
    split = tiny_split("gpt2", len(tokenizer), dropout=0.1)
    fed = make_federation(split, client_data(examples, tokenizer, [6, 6]), Hyper())
    split.full.eval()
    split.client.blocks[0].train()  # a mixed state, restored module by module
    before = [m.training for m in split.full.modules()]
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fed.run_round(0)
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)
    assert [m.training for m in split.full.modules()] == before


# ------------------------------------------------------------------------- simulation scale
def test_per_client_state_is_only_lora_and_adamw(examples, tokenizer):
    """One frozen base serves all clients: per-client state is 3x the LoRA size (tensor, 2 moments)."""
    split = tiny_split("gpt2", len(tokenizer))
    client_lora = sum(p.numel() for p in lora_parameters(split.client).values())
    server_lora = sum(p.numel() for p in lora_parameters(split.server).values())
    sizes = {}
    for K in (1, 4):
        fed = make_federation(split, client_data(examples, tokenizer, [5] * K), Hyper())
        state = fed.state_dict()
        sizes[K] = sum(t.numel() for n, t in state.items() if n.startswith(("client.", "server.")) and
                       not n.endswith(".step"))
        assert sizes[K] == 3 * (K * client_lora + server_lora)


# ------------------------------------------------------------------------- data order
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 12), seed=st.integers(0, 100), client=st.integers(0, 5))
def test_data_stream_visits_every_row_once_per_epoch(n, batch_size, seed, client):
    cursor, drawn = Cursor(), []
    while cursor.epoch < 3:
        rows, cursor = next_indices(n, batch_size, seed, client, cursor)
        assert len(rows) == batch_size
        drawn.extend(rows.tolist())
    for epoch in range(3):
        assert drawn[epoch * n:(epoch + 1) * n] == epoch_order(n, seed, client, epoch).tolist()
        assert sorted(drawn[epoch * n:(epoch + 1) * n]) == list(range(n))


def test_clients_draw_different_orders():
    assert epoch_order(50, 0, 0, 0).tolist() != epoch_order(50, 0, 1, 0).tolist()
    assert epoch_order(50, 0, 0, 0).tolist() != epoch_order(50, 0, 0, 1).tolist()


# ------------------------------------------------------------------------- resume
@pytest.mark.parametrize(("mode", "server_adapter"),
                         [("sfl", "shared"), ("sfl", "per_client"), ("centralized", "shared"),
                          ("fl", "shared"), ("sl", "shared")])
def test_resume_from_saved_state_is_bit_identical(mode, server_adapter, examples, tokenizer, tmp_path):
    """Rounds 0..3 straight equal rounds 0..1, save (safetensors), load into a fresh federation, rounds 2..3.

    Dropout is on, so the saved RNG state matters; batch 4 over 7 rows crosses epochs mid-batch.
    """
    data = client_data(examples, tokenizer, [7, 9])
    hyper = Hyper(mode=mode, local_steps=2, lr=1e-2, seed=5, server_adapter=server_adapter)
    _, straight = train("gpt2", len(tokenizer), data, hyper, 4, dropout=0.1)

    first, _ = train("gpt2", len(tokenizer), data, hyper, 2, dropout=0.1)
    save_file(first.state_dict(), tmp_path / "state.safetensors")
    split = tiny_split("gpt2", len(tokenizer), dropout=0.1)
    resumed = make_federation(split, data, hyper)
    resumed.load_state_dict(load_file(tmp_path / "state.safetensors"))
    for r in (2, 3):
        resumed.run_round(r)
    resumed.load_global_adapter()
    assert_close(global_lora(split), straight, atol=0)


def test_load_state_dict_names_the_bad_key_and_changes_nothing(examples, tokenizer):
    data = client_data(examples, tokenizer, [6, 6])
    fed = make_federation(tiny_split("gpt2", len(tokenizer)), data, Hyper())
    fed.run_round(0)
    good = fed.state_dict()
    lora_key = next(k for k in good if ".lora." in k)
    broken = {
        "missing": ({k: v for k, v in good.items() if k != lora_key}, "missing key"),
        "unexpected": (good | {"client.9.lora.x": torch.zeros(1)}, "unexpected key 'client.9.lora.x'"),
        "shape": (good | {lora_key: torch.zeros(2, 2)}, "expected"),
        "dtype": (good | {lora_key: good[lora_key].double()}, "float64"),
        "cursor": (good | {"cursor.0": torch.tensor([0, 6])}, "invalid cursor"),
    }
    victim = make_federation(tiny_split("gpt2", len(tokenizer)), data, Hyper())
    before = victim.state_dict()
    for case, (state, message) in broken.items():
        with pytest.raises(ValueError, match=message) as info:
            victim.load_state_dict(state)
        assert case == "unexpected" or lora_key in str(info.value) or "cursor.0" in str(info.value)
        after = victim.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before), case


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("field", "value"), [("mode", "gossip"), ("local_steps", 0), ("batch_size", 2.5),
                                              ("lr", 0.0), ("lr", "0.1"), ("lr", float("nan")),
                                              ("weight_decay", -1.0), ("seed", -1),
                                              ("server_adapter", "many")])
def test_hyper_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"Hyper.{field}"):
        Hyper(**{field: value})


def test_per_client_server_adapter_only_for_sfl():
    with pytest.raises(ValueError, match="server_adapter"):
        Hyper(mode="fl", server_adapter="per_client")


def test_make_federation_rejects_bad_client_data(examples, tokenizer):
    split = tiny_split("gpt2", len(tokenizer))
    with pytest.raises(ValueError, match="at least one client"):
        make_federation(split, [], Hyper())
    mismatched = [tokenize(examples[:4], tokenizer, SEQ_LEN), tokenize(examples[4:8], tokenizer, SEQ_LEN + 8)]
    with pytest.raises(ValueError, match=r"client_data\[1\] has seq_len"):
        make_federation(split, mismatched, Hyper())
    with pytest.raises(ValueError, match=r"client_data\[0\] must be TokenizedExamples"):
        make_federation(split, [examples[:4]], Hyper())
    no_lora = split_model(build_demo_model(len(tokenizer), seed=0, num_layers=2, hidden_size=32, num_heads=2), 1)
    with pytest.raises(ValueError, match="split.client has no LoRA tensors"):
        make_federation(no_lora, [tokenize(examples[:4], tokenizer, SEQ_LEN)], Hyper())


