"""pippin's transformer against transformers' on random tiny configs (several GQA ratios, tied/untied, QK-norm)."""

import pytest
import torch

from pippin.model.checkpoint import build_model, config_to_hf
from tests.conftest import tiny_model

transformers = pytest.importorskip("transformers")


def hf_twin(model):
    """A transformers model with exactly pippin's weights (Llama, or Qwen3 for QK-norm)."""
    cfg = model.config
    common = {k: v for k, v in config_to_hf(cfg).items() if k != "model_type"}
    if cfg.qk_norm:
        hf_cfg = transformers.Qwen3Config(**common)
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, mlp_bias=False))
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = model.embed_tokens.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize(
    "heads,kv_heads,tied,qk_norm",
    [(4, 4, True, False), (4, 2, True, False), (4, 1, False, False), (8, 2, False, False), (4, 2, True, True)],
)
def test_logits_match_transformers(heads, kv_heads, tied, qk_norm):
    model = tiny_model(seed=heads * 10 + kv_heads, n_heads=heads, n_kv_heads=kv_heads, tie_embeddings=tied, qk_norm=qk_norm, head_dim=16)
    hf = hf_twin(model)
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert ours.abs().max() > 1.0  # not a degenerate all-zeros comparison
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_logits_at_selects_one_position_per_row():
    model = tiny_model()
    tokens = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, logits_at=torch.tensor([9, 0, 4]))
    torch.testing.assert_close(picked, full[torch.arange(3), torch.tensor([9, 0, 4])])


def test_build_model_rejects_mismatched_state():
    from pippin.errors import PippinError

    model = tiny_model()
    state = model.state_dict()
    state.pop("norm.weight")
    with pytest.raises(PippinError, match="missing"):
        build_model(model.config, state, source="x")
    state = model.state_dict()
    state["norm.weight"] = torch.ones(3)
    with pytest.raises(PippinError, match="shape"):
        build_model(model.config, state, source="x")
