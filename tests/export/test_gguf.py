"""GGUF export: exact round trips of full precision (tiny and real), the compressed-type mapping and the fidelity report
(checked against gguf-py's own quantization and an independent KL), the rotated model as a plain Llama, the tokenizer."""

import json

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.export.gguf import export_gguf, lossy_type, permute_rope, report_path
from pippin.model.checkpoint import load_gguf, unpermute_rope
from tests.conftest import tiny_model
from tests.export.conftest import PLAN_BITS, loaded, on_ggml_grid

Q = gguf.GGMLQuantizationType


def test_permute_rope_is_the_inverse_of_unpermute():
    w = torch.randn(12 * 8, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 12), 12), w)
    assert not torch.equal(permute_rope(w, 12), w)


@pytest.mark.parametrize("grid", [True, False], ids=["ggml-grid", "random"])
def test_full_precision_round_trip_is_exact(tmp_path, grid):
    """Weights on the Q4_1 / Q8_0 grids come back in those types; others in F32. Either way pippin reads back the same
    state dict bit for bit, and the same logits."""
    model = tiny_model()
    if grid:
        on_ggml_grid(model)
    report = export_gguf(loaded(model), tmp_path / "m.gguf", fidelity_tokens=list(range(40)))
    back = load_gguf(tmp_path / "m.gguf").model
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), back(ids))
    assert report.exact and all(r.exact and r.rel_error == 0 for r in report.tensors)
    types = {r.name: r.written for r in report.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == ("Q4_1" if grid else "F32")
    assert types["token_embd.weight"] == ("Q8_0" if grid else "F32")
    assert report.fidelity["kl_mean"] == 0 and report.fidelity["top1_agreement"] == 1
    assert json.loads(report_path(tmp_path / "m.gguf").read_text())["exact"] is True


def test_compressed_tensors_get_the_nearest_types_and_the_report_measures_the_loss(tmp_path, compressed_tiny):
    """Each palettized tensor is written in the type `lossy_type` names (gguf-py's own quantization of pippin's weight,
    Q/K rows permuted), and the reported KL and top-1 equal an independent computation on the file read back."""
    model, plan = compressed_tiny
    tokens = list(range(3, 200))
    report = export_gguf(loaded(model), tmp_path / "c.gguf", fidelity_tokens=tokens)
    reader = gguf.GGUFReader(str(tmp_path / "c.gguf"))
    by_name = {t.name: t for t in reader.tensors}
    q_proj = model.layers[0].self_attn.q_proj
    want_type = lossy_type(plan["layers.0.self_attn.q_proj"], 64)[1]
    w = permute_rope(q_proj.dequantize(), 4).numpy()
    stored = by_name["blk.0.attn_q.weight"]
    assert stored.tensor_type == want_type
    assert np.array_equal(np.asarray(stored.data), gguf.quants.quantize(w, want_type))
    # A down_proj that rotates its input online (R4) is written as its weight in the input's own basis, W = W' R^T.
    down = model.layers[0].mlp.down_proj
    assert down.in_signs is not None and any("R4" in n for n in report.notes)
    stored = by_name["blk.0.ffn_down.weight"]
    assert np.array_equal(np.asarray(stored.data), gguf.quants.quantize(down.dequantize().numpy(), stored.tensor_type))
    records = {r.name: r for r in report.tensors}
    assert {r.source for r in report.tensors} >= {f"palette{b}" for b in PLAN_BITS} | {"palette4", "fp32"}
    for r in report.tensors:
        bits = None if r.source == "fp32" else int(r.source.removeprefix("palette"))
        assert r.written == ("F32" if bits is None else lossy_type(bits, 64)[1].name), r.name
        assert r.exact == (bits is None)
    # The rotated head has no runtime step in a plain Llama: it is an untied output matrix.
    assert "output.weight" in records and records["output.weight"].source == "palette4"
    assert not report.exact and report.fallbacks and report.notes
    back = load_gguf(tmp_path / "c.gguf").model
    ids = torch.tensor([tokens])
    with torch.no_grad():
        p, q = F.log_softmax(model(ids), -1), F.log_softmax(back(ids), -1)
    kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    assert report.fidelity["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
    assert report.fidelity["kl_mean"] > 0
    assert report.fidelity["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))


def test_rotated_model_written_in_f32_is_a_plain_llama_with_the_same_logits(tmp_path, compressed_tiny):
    """With every compressed width mapped to F32 the file holds pippin's dense weights: read back as a plain Llama
    (no rotation step, untied head), it computes the compressed model's logits."""
    model, _ = compressed_tiny
    report = export_gguf(loaded(model), tmp_path / "f.gguf", types={b: "F32" for b in (*PLAN_BITS, 8)})
    assert report.exact and set(report.types) == {"F32"}
    back = load_gguf(tmp_path / "f.gguf").model
    assert not back.config.tie_embeddings and type(back.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(back(ids), model(ids), atol=2e-4, rtol=1e-4)


def test_bad_type_override_is_refused(tmp_path, compressed_tiny):
    with pytest.raises(PippinError, match="Cannot map 3-bit"):
        export_gguf(loaded(compressed_tiny[0]), tmp_path / "x.gguf", types={3: "Q3_XYZ"})
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.real
@pytest.mark.slow
def test_real_full_precision_export_is_exact_and_keeps_the_tokenizer(tmp_path, real_model):
    """The default model exports to the shipped file's types (Q4_1, a Q8_0 embedding, F32 norms) with every tensor
    bit-exact; pippin reads back the same weights, tokenizer and logits."""
    report = export_gguf(real_model, tmp_path / "fp.gguf")
    assert report.exact and report.types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert report.tokenizer.startswith("copied from")
    back = load_gguf(tmp_path / "fp.gguf")
    a, b = real_model.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([real_model.tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    assert torch.equal(real_model.model(ids), back.model(ids))
    assert back.tokenizer.encode("x = 12345 + über") == real_model.tokenizer.encode("x = 12345 + über")


@pytest.mark.real
def test_tokenizer_keys_built_from_tokenizer_json_match_the_source_gguf(real_model):
    """For a model without a source GGUF the keys are built from tokenizer.json: they equal the shipped file's."""
    from pippin.export.gguf_vocab import source_gguf_fields, tokenizer_fields

    built = {k: v for k, v, *_ in tokenizer_fields(real_model.tokenizer)}
    source = {k: v for k, v, *_ in source_gguf_fields(real_model.meta["source"], 49152)}
    for key, value in built.items():
        assert value == source[key], key
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template"} <= built.keys()


def test_cli_exports_a_saved_model_and_prints_the_report(tmp_path, capsys):
    from pippin.cli import main
    from pippin.model.checkpoint import save_pippin

    model = tiny_model()
    on_ggml_grid(model)
    save_pippin(loaded(model), tmp_path / "tiny")
    assert main(["export", str(tmp_path / "tiny"), "--to", "gguf", "--out", str(tmp_path / "t.gguf"), "--fidelity-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "every tensor equals pippin's bit for bit" in out and "KL(pippin || gguf) mean 0.0000" in out
    back = load_gguf(tmp_path / "t.gguf").model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert main(["export", str(tmp_path / "tiny"), "--to", "gguf", "--out", str(tmp_path / "u.gguf"), "--type", "three=Q8_0"]) == 2
    assert "write BITS=TYPE" in capsys.readouterr().err
