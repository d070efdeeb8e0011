"""Core ML export: the traced stateful decoder computes pippin's logits through its KV cache (a prefill, then decode
steps), the saved mlpackage declares that cache as state, and its palettized weights are pippin's LUTs and indices
(read back from its MIL program; Core ML cannot run predictions on Linux).

coremltools is in the dev extra, so these run in CI; they skip only where it is not installed."""

import numpy as np
import pytest
import torch

from pippin.export.tensors import export_tensors
from pippin.quant.pack import unpack
from tests.conftest import tiny_model
from tests.export.conftest import loaded

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0, in pippin's dev extra)")

from pippin.export.coreml import DecoderGraph, causal_mask, const_name, export_coreml, read_program  # noqa: E402


def test_decoder_graph_prefills_then_decodes_pippins_logits(compressed_tiny):
    """The graph Core ML converts (explicit mask, repeated K/V, row scales and head mix outside the weights, the KV
    cache written in place) is the compressed model's function: a 5-token prefill then 3 one-token steps give the
    logits of one full forward, up to the cache's fp16 rounding; after a reset, a shorter sequence reads none of the
    first one's cache."""
    model, _ = compressed_tiny
    graph = DecoderGraph(model, export_tensors(model), 16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (1, 8), generator=gen)
    with torch.no_grad():
        ref = model(ids)
        got = [graph(ids[:, :5], causal_mask(5, 5))] + [graph(ids[:, t : t + 1], causal_mask(1, t + 1)) for t in range(5, 8)]
        torch.testing.assert_close(torch.cat(got, 1), ref, atol=2e-2, rtol=1e-2)
        assert torch.equal(torch.cat(got, 1).argmax(-1), ref.argmax(-1))
        graph.reset()
        other = torch.randint(0, 256, (1, 3), generator=gen)
        torch.testing.assert_close(graph(other, causal_mask(3, 3)), model(other), atol=2e-2, rtol=1e-2)


def test_the_trace_keeps_the_shapes_flexible(compressed_tiny):
    """Core ML converts the trace, not the module: traced on 4 tokens, it still prefills 5 and decodes one at a time
    as the module does (sizes and cache slices follow the inputs, not the trace's example)."""
    model, _ = compressed_tiny
    graph = DecoderGraph(model, export_tensors(model), 16)
    with torch.no_grad():
        traced = torch.jit.trace(graph, (torch.zeros(1, 4, dtype=torch.long), causal_mask(4, 4)))
        graph.reset()
        ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
        steps = [(ids[:, :5], causal_mask(5, 5)), (ids[:, 5:6], causal_mask(1, 6)), (ids[:, 6:7], causal_mask(1, 7))]
        want = [graph(*s) for s in steps]
        graph.reset()
        got = [traced(*s) for s in steps]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


def test_causal_mask_lets_each_new_token_see_itself_and_the_past():
    m = causal_mask(2, 5)
    assert m.shape == (1, 1, 2, 5) and m.dtype == torch.float16
    assert (m[0, 0, 0, :4] == 0).all() and m[0, 0, 0, 4] == float("-inf") and (m[0, 0, 1] == 0).all()


def test_palettized_weights_are_pippins_luts_and_indices(tmp_path, compressed_tiny):
    model, plan = compressed_tiny
    report = export_coreml(loaded(model), tmp_path / "m.mlpackage", context=16)
    # Every linear and the embedding, but the down_projs that rotate their input (R4): folded dense, W = W' R^T.
    r4 = [n for n in plan if model.get_submodule(n).in_signs is not None]
    assert len(r4) == 2 and report.all_equal and report.palettized == len(plan) + 1 - len(r4)
    assert {c["name"] for c in report.checks if c["kind"] == "dense"} >= {n + ".weight" for n in r4}
    ops = read_program(tmp_path / "m.mlpackage")
    luts = {n: op for n, op in ops.items() if op.op_type == "constexpr_lut_to_dense"}
    assert len(luts) == len(plan) + 1 - len(r4)
    # One layer by hand: Core ML's LUT (G, 1, 2^b, 1) and indices are pippin's arrays (sorted, distinct LUT entries).
    name = "layers.1.mlp.up_proj"
    layer = model.get_submodule(name)
    op = luts[const_name(name + ".weight") + "_palettized"]
    lut = op.inputs["lut"].val.reshape(layer.lut.shape[0], -1)
    assert lut.shape == (layer.lut.shape[0], 2 ** plan[name])
    dense = lut[np.arange(layer.out_features)[:, None] // 16, op.inputs["indices"].val]
    unit = layer.lut.float().repeat_interleave(16, 0).gather(1, unpack(layer.packed, plan[name], layer.in_features))
    assert layer.row_scale is not None  # the graph multiplies the row scales in after the matmul
    assert np.array_equal(dense, unit.half().numpy())
    palettes = [c for c in report.checks if c["kind"] == "palette"]
    assert {c["bits"] for c in palettes} == {2, 3, 4, 6} and all(c["coreml_bits"] == c["bits"] for c in palettes)
    assert sum(c["identical"] for c in palettes) >= len(plan) // 2  # the rest: a duplicate or unused LUT entry


def test_full_precision_weights_are_dense_fp16(tmp_path):
    model = tiny_model()
    report = export_coreml(loaded(model), tmp_path / "fp.mlpackage", context=8)
    assert report.all_equal and report.palettized == 0
    ops = read_program(tmp_path / "fp.mlpackage")
    got = ops[const_name("layers.0.self_attn.k_proj.weight")].val.val
    assert np.array_equal(got, model.layers[0].self_attn.k_proj.weight.detach().half().numpy())
    assert not any(op.op_type.startswith("constexpr") for op in ops.values())


def test_the_package_is_a_stateful_decoder_with_flexible_shapes(tmp_path):
    """The spec declares the KV caches as fp16 state of (layers, 1, KV heads, context, head dim), and inputs that take
    a prompt or one token; the program reads and updates that state."""
    model = tiny_model()
    export_coreml(loaded(model), tmp_path / "s.mlpackage", context=12)
    spec = ct.models.MLModel(str(tmp_path / "s.mlpackage"), skip_model_load=True).get_spec()
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in spec.description.state}
    a = model.layers[0].self_attn
    assert states == {n: [2, 1, a.n_kv_heads, 12, a.head_dim] for n in ("k_cache", "v_cache")}
    assert all(s.type.stateType.arrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16 for s in spec.description.state)
    inputs = {i.name: i.type.multiArrayType.shapeRange.sizeRanges for i in spec.description.input}
    assert [(r.lowerBound, r.upperBound) for r in inputs["tokens"]] == [(1, 1), (1, 12)]
    assert [(r.lowerBound, r.upperBound) for r in inputs["mask"]] == [(1, 1), (1, 1), (1, 12), (1, 12)]
    assert spec.description.metadata.userDefined["pippin.context"] == "12"
    kinds = {op.op_type for op in read_program(tmp_path / "s.mlpackage").values()}
    assert {"read_state", "coreml_update_state"} <= kinds
