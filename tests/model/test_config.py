import pytest
import torch

from pippin.errors import PippinError
from pippin.model.config import PRESETS, ModelConfig, get_preset
from pippin.model.transformer import Transformer


def test_afm_on_device_parameter_counts_on_meta():
    cfg = get_preset("afm-on-device")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size) == (
        26,
        3072,
        24,
        8,
        128,
        8064,
        49152,
    )
    assert cfg.qk_norm and cfg.tie_embeddings and cfg.rope_theta == 5e5
    with torch.device("meta"):
        model = Transformer(cfg)
    emb = model.embed_tokens.weight.numel()
    non_emb = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    # The AFM report's "2.58B non-embedding + 0.15B embedding" (figures truncated: 2.587B and 0.151B).
    assert 2.58e9 <= non_emb < 2.59e9
    assert 0.15e9 <= emb < 0.16e9
    assert cfg.param_counts() == {"embedding": emb, "non_embedding": non_emb}


def test_smollm2_preset_matches_real_shape():
    cfg = get_preset("smollm2-135m")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_unknown_preset_names_choices():
    with pytest.raises(PippinError, match="afm-on-device"):
        get_preset("llama-9000")


def test_bad_gqa_ratio_rejected():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(n_heads=9, n_kv_heads=2)


def test_config_json_roundtrip_and_unknown_keys():
    for name in PRESETS:
        cfg = get_preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown model config keys"):
        ModelConfig.from_dict({"dim": 64, "n_head": 4})


def test_presets_are_copies():
    get_preset("tiny").eos_token_ids.append(99)
    assert 99 not in get_preset("tiny").eos_token_ids


def test_pippin_error_is_distinct():
    assert not issubclass(PippinError, ValueError)
