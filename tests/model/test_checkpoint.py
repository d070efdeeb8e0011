"""Checkpoint formats: HF folders (single and sharded), GGUF (with llama.cpp's Q/K permutation), pippin's own."""

import json

import numpy as np
import pytest
import torch

from pippin.errors import PippinError
from pippin.model.checkpoint import GGUF_NAMES, LoadedModel, load_model, save_pippin
from tests.conftest import tiny_model

gguf = pytest.importorskip("gguf")


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the forward of what pippin undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path, *, qtype=None, tensor_type_override=None):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {hf: gg for gg, hf in GGUF_NAMES.items()}
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name.startswith("layers."):
            _, i, *rest = name.split(".")
            mod = ".".join(rest[:-1])
            gname = f"blk.{i}.{names[mod]}.weight"
        else:
            gname = f"{names[name.rsplit('.', 1)[0]]}.weight"
        if name.endswith("q_proj.weight"):
            a = _llama_cpp_permute(a, cfg.n_heads)
        if name.endswith("k_proj.weight"):
            a = _llama_cpp_permute(a, cfg.n_kv_heads)
        if tensor_type_override and gname == tensor_type_override[0]:
            w.add_tensor(gname, np.zeros((a.shape[0], a.shape[1] // 32 * 40), dtype=np.uint8), raw_dtype=tensor_type_override[1])
        elif qtype is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_f32_roundtrip_undoes_rope_permutation(tmp_path, tied):
    model = tiny_model(tie_embeddings=tied)
    write_tiny_gguf(model, tmp_path / "m.gguf")
    loaded = load_model(tmp_path / "m.gguf")
    assert loaded.model.config.tie_embeddings == tied
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens), atol=1e-5, rtol=0)


def test_gguf_q8_0_dequantizes_close(tmp_path):
    model = tiny_model()
    write_tiny_gguf(model, tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_model(tmp_path / "m.gguf")
    w0, w1 = model.layers[0].self_attn.q_proj.weight, loaded.model.layers[0].self_attn.q_proj.weight
    assert (w0 - w1).abs().max() < 0.01 * w0.abs().max()  # 8-bit: close, and in the right row order


def test_gguf_unsupported_type_is_a_clear_error(tmp_path):
    model = tiny_model()
    write_tiny_gguf(model, tmp_path / "m.gguf", tensor_type_override=("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q8_1))
    with pytest.raises(PippinError, match=r"blk\.0\.ffn_up\.weight uses GGUF type Q8_1"):
        load_model(tmp_path / "m.gguf")


def test_not_a_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(PippinError, match="corrupt or not a GGUF"):
        load_model(tmp_path / "x.gguf")


@pytest.mark.parametrize("shard", [False, True])
def test_hf_folder_loads_with_same_logits(tmp_path, shard):
    transformers = pytest.importorskip("transformers")
    from tests.model.test_transformer import hf_twin

    model = tiny_model(tie_embeddings=False)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "10GB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    loaded = load_model(tmp_path)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    assert transformers  # imported for save_pretrained


def test_pippin_format_roundtrip_is_self_describing(tmp_path):
    model = tiny_model(qk_norm=True)
    save_pippin(LoadedModel(model=model, tokenizer=None, path=tmp_path, meta={"source": "test"}), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["format"] == "pippin" and cfg["model"]["qk_norm"] is True and cfg["source"] == "test"
    loaded = load_model(tmp_path / "ck")
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens), model(tokens))
    assert not list((tmp_path / "ck").glob("*.tmp"))  # atomic writes leave no temporaries


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    model = tiny_model()
    save_pippin(LoadedModel(model=model, tokenizer=None, path=tmp_path, meta={}), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(PippinError, match="corrupt or truncated"):
        load_model(tmp_path / "ck")
    weights.unlink()
    with pytest.raises(PippinError, match="missing"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(PippinError, match="not valid JSON"):
        load_model(tmp_path / "ck")
    with pytest.raises(PippinError, match="No model at"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "w.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PippinError, match="not a .gguf"):
        load_model(tmp_path / "w.bin")


def test_hf_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 256,
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            }
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PippinError, match="never .bin/pickle"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(PippinError, match="not a Llama-architecture"):
        load_model(tmp_path)


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "afm-on-device"])
def test_hf_config_roundtrip(preset):
    from pippin.model.checkpoint import config_from_hf, config_to_hf
    from pippin.model.config import get_preset

    cfg = get_preset(preset)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_overwriting_a_checkpoint_has_one_commit_point(tmp_path, monkeypatch):
    """config.json marks a complete checkpoint: a crash while a folder is overwritten (after the new weights, before
    the new config) leaves a folder refused as incomplete, never new weights under the old config; a failed weights
    write leaves no temporary file behind."""
    import pippin.model.checkpoint as ck

    old, new = tiny_model(seed=1), tiny_model(seed=2, n_layers=3)
    ck.save_pippin(LoadedModel(model=old, tokenizer=None, path=tmp_path, meta={"name": "old"}), tmp_path / "ck")

    def crash(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json_atomic", crash)
    with pytest.raises(OSError):
        ck.save_pippin(LoadedModel(model=new, tokenizer=None, path=tmp_path, meta={"name": "new"}), tmp_path / "ck")
    monkeypatch.undo()
    with pytest.raises(PippinError, match="no config.json"):
        load_model(tmp_path / "ck")
    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError):
        ck.save_pippin(LoadedModel(model=new, tokenizer=None, path=tmp_path, meta={}), tmp_path / "ck")
    assert not list((tmp_path / "ck").glob(".*tmp"))
