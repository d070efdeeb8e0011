"""Core ML export: the traced prefill graph computes pippin's logits, and the saved mlpackage's palettized weights are
pippin's LUTs and indices (read back from its MIL program; Core ML cannot run predictions on Linux).

coremltools is in the dev extra, so these run in CI; they skip only where it is not installed."""

import numpy as np
import pytest
import torch

from pippin.export.tensors import export_tensors
from pippin.quant.pack import unpack
from tests.conftest import tiny_model
from tests.export.conftest import loaded

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools==9.0, in pippin's dev extra)")

from pippin.export.coreml import PrefillGraph, const_name, export_coreml, read_program  # noqa: E402


def test_prefill_graph_computes_pippins_logits(compressed_tiny):
    """The graph Core ML converts (explicit mask, repeated K/V, row scales and head mix outside the weights) is the
    compressed model's function."""
    model, _ = compressed_tiny
    graph = PrefillGraph(model, export_tensors(model), 16)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), model(ids), atol=1e-4, rtol=1e-4)


def test_palettized_weights_are_pippins_luts_and_indices(tmp_path, compressed_tiny):
    model, plan = compressed_tiny
    report = export_coreml(loaded(model), tmp_path / "m.mlpackage", seq_len=16)
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
    report = export_coreml(loaded(model), tmp_path / "fp.mlpackage", seq_len=8)
    assert report.all_equal and report.palettized == 0
    ops = read_program(tmp_path / "fp.mlpackage")
    got = ops[const_name("layers.0.self_attn.k_proj.weight")].val.val
    assert np.array_equal(got, model.layers[0].self_attn.k_proj.weight.detach().half().numpy())
    assert not any(op.op_type.startswith("constexpr") for op in ops.values())
