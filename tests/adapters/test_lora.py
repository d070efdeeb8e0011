"""LoRA wrappers, the PEFT format (both directions, against real peft), the AdapterStore and mixed batches."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pippin.adapters.lora import LoraConfig, LoRALinear, apply_lora, base_fingerprint, lora_modules, merge_lora_, routing_of
from pippin.adapters.peft_format import WEIGHTS_FILE, Adapter, adapter_from_model, load_adapter, save_adapter
from pippin.adapters.store import AdapterStore
from pippin.engine.engine import Engine
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from tests.conftest import fused_block_calls, tiny_model

CFG = LoraConfig(rank=4, alpha=8.0)


def random_adapter(model: nn.Module, name: str, *, seed: int, rank: int = 4, scale: float = 0.5, meta: dict | None = None) -> Adapter:
    """An adapter with random A and B (a trained one would have B != 0 too), fitted to `model`'s targets."""
    g = torch.Generator().manual_seed(seed)
    weights, scales = {}, {}
    for mod, m in lora_modules(model).items():
        A = torch.randn(rank, m.in_features, generator=g) * 0.3
        B = torch.randn(m.out_features, rank, generator=g) * 0.3
        weights[mod], scales[mod] = (A.half(), B.half()), scale
    return Adapter(name=name, config=LoraConfig(rank=rank, alpha=scale * rank), weights=weights, scales=scales, meta=meta or {})


def served(seed: int = 0, n_slots: int = 4, **kw) -> tuple[nn.Module, AdapterStore]:
    model = tiny_model(seed, **kw)
    apply_lora(model, CFG, n_slots=n_slots)
    return model, AdapterStore(None, model=model)


def dense_reference(model: nn.Module, adapter: Adapter | None) -> nn.Module:
    """A plain model with the adapter folded into dense weights: the slow reference."""
    ref = tiny_model(0)
    ref.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k})
    if adapter is not None:
        with torch.no_grad():
            for mod, (A, B) in adapter.weights.items():
                ref.get_submodule(mod).weight += adapter.scales[mod] * (B.float() @ A.float())
    return ref


def test_lora_linear_adds_scaled_low_rank_update_and_slot_zero_is_the_base():
    model, store = served()
    tokens = torch.randint(0, 256, (2, 10))
    base = dense_reference(model, None)(tokens)
    store.route([None, None])
    torch.testing.assert_close(model(tokens), base)
    a = random_adapter(model, "a", seed=1)
    store.put(a)
    store.route(["a", "a"])
    torch.testing.assert_close(model(tokens), dense_reference(model, a)(tokens), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model(tokens), base, atol=1e-3)


def test_mixed_adapter_batch_equals_each_row_alone():
    model, store = served()
    for i, n in enumerate(["a", "b", "c"]):
        store.put(random_adapter(model, n, seed=i + 1))
    names = ["a", None, "b", "c", "a"]
    prompts = [[5, 6, 7], [9, 10, 11, 12], [3], [40, 41], [7, 7, 7, 7, 7]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    engine = Engine(model, max_batch=5, max_len=64, adapters=store)
    together = engine.generate_ids(prompts, params, adapters=names)
    alone = [engine.generate_ids([p], params, adapters=[n])[0] for p, n in zip(prompts, names)]
    assert together == alone
    # Logit level too, on one forward pass.
    tokens = torch.randint(0, 256, (3, 6))
    store.route(["a", "b", None])
    mixed = model(tokens)
    for i, n in enumerate(["a", "b", None]):
        store.route([n])
        torch.testing.assert_close(mixed[i : i + 1], model(tokens[i : i + 1]), atol=1e-5, rtol=1e-5)
    # Different adapters really change the output.
    assert len({tuple(x) for x in together[:1] + together[2:4]}) > 1


def test_lora_over_palettized_base_and_merge_rules():
    from pippin.quant.compress import CompressConfig, compress_

    model = tiny_model()
    compress_(model, list(range(3, 250)) * 4, CompressConfig(candidate_bits=(4,), bpw=16, seq_len=128, n_seqs=2))
    apply_lora(model, CFG, n_slots=2)
    store = AdapterStore(None, model=model)
    a = random_adapter(model, "a", seed=3)
    store.put(a)
    x = torch.randn(2, 3, 64)
    m = model.layers[0].self_attn.q_proj
    assert isinstance(m, LoRALinear) and type(m.base).__name__ == "PalettizedLinear"
    store.route(["a"])
    A, B = a.weights["layers.0.self_attn.q_proj"]
    torch.testing.assert_close(m(x), m.base(x) + 0.5 * (x @ A.float().T) @ B.float().T, atol=1e-5, rtol=1e-5)
    with pytest.raises(PippinError, match="compressed base"):
        merge_lora_(model, slot=1)


def test_merge_into_dense_base_equals_adapter_forward():
    model, store = served()
    a = random_adapter(model, "a", seed=4)
    store.put(a)
    slot = store.route(["a"])[0]
    tokens = torch.randint(0, 256, (1, 8))
    want = model(tokens)
    merge_lora_(model, slot=slot)
    assert not lora_modules(model)
    torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)


def test_save_load_roundtrip_is_peft_shaped(tmp_path):
    model, store = served()
    a = random_adapter(model, "sum", seed=5, meta={"base_fingerprint": store.fingerprint, "init_from": "recovery"})
    save_adapter(a, tmp_path / "sum", base_model="tiny")
    cfg = json.loads((tmp_path / "sum" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and "pippin" not in json.dumps(cfg)
    b = load_adapter(tmp_path / "sum")
    assert b.meta["init_from"] == "recovery" and b.name == "sum"
    for mod, (A, B) in a.weights.items():
        assert torch.equal(b.weights[mod][0], A) and torch.equal(b.weights[mod][1], B)
        assert b.scales[mod] == pytest.approx(a.scales[mod])


def test_weights_beyond_fp16_are_refused(tmp_path):
    """A finite fp32 weight past fp16's range would be served as inf: the check comes after the fp16 cast."""
    from safetensors.torch import load_file, save_file

    model, _ = served()
    save_adapter(random_adapter(model, "big", seed=1), tmp_path / "big")
    tensors = {k: v.float() for k, v in load_file(tmp_path / "big" / WEIGHTS_FILE).items()}
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = 1e6
    save_file(tensors, tmp_path / "big" / WEIGHTS_FILE)
    with pytest.raises(PippinError, match="not finite in fp16"):
        load_adapter(tmp_path / "big")


def test_alpha_and_rank_patterns_are_module_names_not_regexes(tmp_path):
    model, _ = served()
    a = random_adapter(model, "pat", seed=2)
    save_adapter(a, tmp_path / "pat")
    cfg_path = tmp_path / "pat" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["alpha_pattern"] = {"q_proj": 3 * cfg["lora_alpha"], "layers.1.mlp.down_proj": 2 * cfg["lora_alpha"]}
    cfg_path.write_text(json.dumps(cfg))
    b = load_adapter(tmp_path / "pat")
    for mod, scale in b.scales.items():
        want = 3 if mod.endswith("q_proj") else 2 if mod.endswith("layers.1.mlp.down_proj") else 1
        assert scale == pytest.approx(want * a.scales[mod]), mod
    # A regex that backtracks exponentially on module names (the old code compiled and ran it, and hung).
    cfg["rank_pattern"] = {"([a-z_.0-9]+)+!": 4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PippinError, match="not a module name"):
        load_adapter(tmp_path / "pat")


def _peft_model(model: nn.Module, peft_dir=None, *, init: bool = True):
    peft = pytest.importorskip("peft")
    from tests.model.test_transformer import hf_twin

    hf = hf_twin(dense_reference(model, None))
    if peft_dir is not None:
        return peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: B is no longer zero; fp16-representable, as pippin stores it
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
            if "lora_" in n:
                p.copy_(p.half().float())
    return pm.eval()


def test_pippin_adapter_loads_into_peft_with_same_logits(tmp_path):
    model, store = served()
    save_adapter(random_adapter(model, "x", seed=6), tmp_path / "x", base_model="tiny")
    store.add("x", tmp_path / "x")
    store.route(["x"])
    tokens = torch.randint(0, 256, (2, 12))
    pm = _peft_model(model, tmp_path / "x")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), pm(tokens).logits, atol=1e-4, rtol=1e-4)


def test_peft_trained_adapter_loads_into_pippin_with_same_logits(tmp_path):
    model, store = served()
    pm = _peft_model(model)
    pm.save_pretrained(str(tmp_path / "p"))
    store.add("p", tmp_path / "p")
    store.route(["p"])
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = pm(tokens).logits
    torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)


def test_store_lru_budget_hits_misses_and_slot_swaps(tmp_path):
    model, _ = served(n_slots=3)  # 2 usable slots
    adapters = [random_adapter(model, f"a{i}", seed=10 + i) for i in range(4)]
    for a in adapters:
        save_adapter(a, tmp_path / a.name)
    store = AdapterStore(tmp_path, model=model, budget_bytes=int(adapters[0].nbytes * 2.5))
    assert store.names() == ["a0", "a1", "a2", "a3"]
    store.get("a0"), store.get("a1"), store.get("a0")
    assert (store.stats.misses, store.stats.hits) == (2, 1)
    store.get("a2")  # over budget: the least recently used (a1) goes
    assert store.loaded() == ["a0", "a2"] and store.stats.evictions == 1
    store.route(["a0", "a2"])
    with pytest.raises(PippinError, match="at most 2 different adapters"):
        store.route(["a0", "a1", "a3"])
    # A swap replaces the least recently used slot; outputs follow the new adapter exactly.
    store.route(["a3"])
    tokens = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(model(tokens), dense_reference(model, adapters[3])(tokens), atol=1e-4, rtol=1e-4)
    assert store.stats.swaps == 3


def test_routing_to_a_cold_adapter_reads_the_disk_outside_the_store_lock(tmp_path, monkeypatch):
    """The worker routes every step; a cold adapter's disk read must not hold the lock that /v1/models and /metrics
    take from the event loop."""
    import threading

    import pippin.adapters.store as st

    model, _ = served(n_slots=3)
    save_adapter(random_adapter(model, "cold", seed=3), tmp_path / "cold")
    store = AdapterStore(tmp_path, model=model)
    got = []
    real = st.load_adapter

    def try_lock() -> None:
        got.append(store._lock.acquire(timeout=0.5))
        if got[-1]:
            store._lock.release()

    def spy(path, **kw):  # noqa: ANN001, ANN202
        other = threading.Thread(target=try_lock)
        other.start()
        other.join()
        return real(path, **kw)

    monkeypatch.setattr(st, "load_adapter", spy)
    store.route(["cold", None])
    assert got == [True] and store.stats.misses == 1  # another thread took the lock during the read


def test_store_refuses_bad_names_mismatches_and_corrupt_files(tmp_path):
    model, store = served()
    for bad in ["../x", "a/b", "", ".hidden", "x" * 65]:
        with pytest.raises(PippinError, match="Invalid adapter name"):
            store.get(bad)
    with pytest.raises(PippinError, match="Unknown adapter"):
        AdapterStore(tmp_path, model=model).get("nope")
    # Trained for another architecture: shapes do not fit.
    other = tiny_model(0, dim=32, head_dim=8)
    apply_lora(other, CFG, n_slots=2)
    save_adapter(random_adapter(other, "small", seed=1), tmp_path / "small")
    # Rank over the slots' capacity.
    save_adapter(random_adapter(model, "big", seed=1, rank=8), tmp_path / "big")
    # Trained on a different base (fingerprint recorded).
    save_adapter(random_adapter(model, "elsewhere", seed=1, meta={"base_fingerprint": "0123456789abcdef"}), tmp_path / "elsewhere")
    # Corrupt weights file.
    save_adapter(random_adapter(model, "broken", seed=1), tmp_path / "broken")
    data = (tmp_path / "broken" / WEIGHTS_FILE).read_bytes()
    (tmp_path / "broken" / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    store = AdapterStore(tmp_path, model=model)
    for name, msg in [("small", "does not fit"), ("big", "rank 8"), ("elsewhere", "trained on base"), ("broken", "corrupt")]:
        with pytest.raises(PippinError, match=msg):
            store.route([name])
    # The store keeps working after each refusal.
    save_adapter(random_adapter(model, "good", seed=2), tmp_path / "good")
    assert store.route(["good"]) == [1]


def test_fingerprint_tells_bases_apart_and_ignores_lora_and_kernels():
    a = tiny_model(0)
    fp = base_fingerprint(a)
    apply_lora(a, CFG, n_slots=2)
    assert base_fingerprint(a) == fp
    assert base_fingerprint(tiny_model(1)) != fp
    assert routing_of(a).slot is None


def test_trainable_lora_starts_at_the_base_and_only_adapters_get_gradients():
    model = tiny_model()
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        want = model(tokens)
    apply_lora(model, CFG, trainable=True)
    torch.testing.assert_close(model(tokens), want)
    model(tokens).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    snap = adapter_from_model(model, CFG, name="t")
    assert next(iter(snap.weights.values()))[0].dtype == torch.float16


def test_lora_kernel_and_fused_block_match_the_reference():
    from pippin.kernels import ops

    if ops() is None:
        pytest.skip("kernels unavailable")
    # The kernel alone: per-row slots, odd K, zero-scale slot skipped.
    S, r, K, N = 3, 4, 37, 21
    A, B = torch.randn(S, r, K).half(), torch.randn(S, N, r).half()
    scale = torch.tensor([0.0, 0.5, 2.0])
    x, idx = torch.randn(3, 2, K), torch.tensor([2, 0, 1])
    y = torch.randn(3, 2, N)
    want = y + torch.einsum("btk,brk,bnr->btn", x, A[idx].float(), B[idx].float()) * scale[idx].view(-1, 1, 1)
    ops().lora_add_(y, x, A, B, scale, idx)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    # The fused decode block with adapters (uniform prompt lengths -> the one-call block) equals the module path.
    model, store = served()
    for i, n in enumerate(["a", "b"]):
        store.put(random_adapter(model, n, seed=20 + i))
    prompts, names = [[5, 6, 7], [9, 10, 11], [1, 2, 3]], ["a", "b", None]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    reference = Engine(model, max_batch=3, max_len=64, adapters=store, kernels=False)
    ref = reference.generate_ids(prompts, params, adapters=names)
    with fused_block_calls() as calls:  # the prefill block by block, each decode step in the one-region step
        engine = Engine(model, max_batch=3, max_len=64, adapters=store)
        fast = engine.generate_ids(prompts, params, adapters=names)
    assert fast == ref
    assert len(calls) == 2 * 10  # both blocks, for the prefill and each of the 9 decode steps
    assert engine.forward.routes and engine.forward.plan.plan.fused()
    # Rows of one batch at their own offsets, each with its own adapter, through the one-region decode step.
    prompts = [[5, 6, 7, 8, 9], [9, 10], [1, 2, 3]]
    ref = reference.generate_ids(prompts, params, adapters=names)
    calls.clear()
    assert engine.generate_ids(prompts, params, adapters=names) == ref
    assert calls.count(True) == 2 * 9


def test_engine_adapter_argument_errors():
    plain = Engine(tiny_model(), max_len=64)
    params = SamplingParams(max_new_tokens=2)
    with pytest.raises(PippinError, match="no adapter store"):
        plain.generate_ids([[1, 2]], params, adapters=["a"])
    assert plain.generate_ids([[1, 2]], params, adapters=[None]) == plain.generate_ids([[1, 2]], params)
    model, store = served()
    engine = Engine(model, max_batch=2, max_len=64, adapters=store)
    with pytest.raises(PippinError, match="2 adapter names for 1 prompts"):
        engine.generate_ids([[1, 2]], params, adapters=["a", None])
    with pytest.raises(PippinError, match="Unknown adapter"):
        engine.generate_ids([[1, 2]], params, adapters=["missing"])


def test_lora_kernel_on_bank_slots_equals_the_pytorch_reference(monkeypatch):
    """The strided LoraBank views through lora_add_ (inference) against plain bmm/F.linear (kernels off)."""
    import pippin.adapters.lora as lora_mod
    from pippin.kernels import ops

    if ops() is None:
        pytest.skip("kernels unavailable")
    model, store = served()
    for i, n in enumerate(["a", "b", "c"]):
        store.put(random_adapter(model, n, seed=30 + i, rank=4 - i))  # ranks 4, 3, 2: zero padding inside the bank
    A, B, scale = store.bank.views("layers.1.mlp.down_proj")
    assert A.shape == (4, 4, 128) and B.shape == (4, 64, 4) and scale.shape == (4,)
    tokens = torch.randint(0, 256, (3, 1))
    for names in (["a", "b", "c"], ["b", "b", "b"], [None, "c", None]):
        store.route(names)
        with torch.inference_mode():
            fast = model(tokens)
            with monkeypatch.context() as mp:
                mp.setattr(lora_mod, "ops", lambda: None)
                ref = model(tokens)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    # A slot swap writes the bank in place: the module's view shows that adapter's (zero-padded) weights.
    off = store.bank.layout["layers.1.mlp.down_proj"][0]
    c = store.get("c")
    slot = store.slot_for("c")
    assert torch.equal(A[slot].flatten(), c.flat[off : off + A[0].numel()])
    assert not A[slot][2:].any()  # rank 2 adapter: rows 2-3 of A are padding


def test_overwriting_an_adapter_has_one_commit_point(tmp_path, monkeypatch):
    """adapter_config.json marks a complete adapter: a crash while a folder is overwritten (after the new weights, before
    the new config) leaves a folder refused as incomplete, never the new weights under the old config."""
    import pippin.adapters.peft_format as pf

    model, _ = served()
    save_adapter(random_adapter(model, "a", seed=1, rank=4), tmp_path / "a")
    real = pf.write_json_atomic

    def crash_on_config(path, obj):  # noqa: ANN001, ANN202
        if path.name == pf.CONFIG_FILE:
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(pf, "write_json_atomic", crash_on_config)
    new = random_adapter(model, "a", seed=2, rank=4)
    with pytest.raises(OSError):
        save_adapter(new, tmp_path / "a")
    monkeypatch.undo()
    with pytest.raises(PippinError, match="not an adapter folder"):
        load_adapter(tmp_path / "a")
    save_adapter(new, tmp_path / "a")
    got = load_adapter(tmp_path / "a").weights
    assert all(torch.equal(got[m][0], A.half()) and torch.equal(got[m][1], B.half()) for m, (A, B) in new.weights.items())
