"""The online input rotation (QuaRot's R4): the C++ transform against the dense rotation, and the fused decoder against
the model for palettized projections that rotate their input, with and without a LoRA adapter on them."""

import pytest
import torch

from pippin.adapters.lora import LoraConfig, apply_lora
from pippin.adapters.store import AdapterStore
from pippin.engine.generate import decode_step, prefill
from pippin.engine.kv_cache import KVCache
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.quant.linear import PalettizedLinear
from pippin.quant.palettize import fit_palette
from pippin.quant.rotate import HadamardTransform, random_signs, rotation
from tests.adapters.test_lora import random_adapter
from tests.conftest import assert_fused_like_reference, tiny_model

pytestmark = pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable (no AVX2 or no compiler)")


# 1536 = 12 x 128 (down_proj's input in SmolLM2-135M), 2048 = 2^11, 576 = 144 x 4 (two Paley blocks, a scalar Walsh
# transform), 24 = 12 x 2, 12 (signs in a byte and a half).
@pytest.mark.parametrize("n", [1536, 2048, 576, 24, 12])
def test_hadamard_rows_equal_the_dense_rotation(n):
    signs = random_signs(n, n)
    t = HadamardTransform(signs)
    r = rotation(signs)  # float64 (n, n)
    threads = torch.get_num_threads()
    try:
        for rows in (1, 3, 40):  # 40 rows: split over threads in blocks of 16
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows)) * 3
            want = x.double() @ r
            outs = []
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                outs.append(ops().hadamard_rows(x, t.sign_bits, t.block))
            assert torch.equal(outs[0], outs[1])
            torch.testing.assert_close(outs[0].double(), want, atol=1e-5, rtol=1e-5)
            # The PyTorch path (taken for gradients) and the inverse x -> x R^T, factor by factor.
            grad_path = t(x.clone().requires_grad_(True))
            torch.testing.assert_close(grad_path.double(), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(t(want, inverse=True), x.double(), atol=1e-10, rtol=1e-10)
    finally:
        torch.set_num_threads(threads)


def _rotated_model(*, act8: bool) -> torch.nn.Module:
    """tiny_model (ffn 192 = 12 x 16: a Paley block in down_proj's rotation) with every projection palettized at 4 bits;
    down_proj, and in layer 0 q, o and gate too (each beside an unrotated projection that reads the same input), store
    W R and rotate their input."""
    model = tiny_model(seed=7, ffn_dim=192)
    for i, block in enumerate(model.layers):
        projections = [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [(block.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        for j, (owner, name) in enumerate(projections):
            lin = getattr(owner, name)
            rotate = name == "down_proj" or (i == 0 and name in ("q_proj", "o_proj", "gate_proj"))
            signs = random_signs(lin.in_features, 10 * i + j) if rotate else None  # each its own rotation
            w = lin.weight.detach()
            w = w.double() @ rotation(signs) if rotate else w
            q = PalettizedLinear.from_palette(fit_palette(w.float(), bits=4, group_size=16), in_signs=signs)
            q.act8 = act8
            setattr(owner, name, q)
    return model


@pytest.mark.parametrize(("act8", "kv8", "lora"), [(False, False, False), (True, True, False), (True, False, True), (False, False, True)])
def test_fused_decoder_runs_input_rotations_like_the_model(act8, kv8, lora):
    """Rotated projections on every path of the plan: the one-call step (one token per row, ragged rows, 1 and 2
    threads) and the per-block path (the prefill's several tokens per row). A LoRA on a rotated projection reads the
    unrotated input on both (the model's wrapper sees x, not x R)."""
    model = _rotated_model(act8=act8)
    names = None
    if lora:
        apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "down_proj")), n_slots=3)
        store = AdapterStore(None, model=model)
        for k, n in enumerate(("a", "b")):
            store.put(random_adapter(model, n, seed=k + 1))
        names = ["a", None, "b"]
        store.route(names)
    fast = FusedDecoder.from_model(model)
    assert fast.plan.fused() and (not lora or fast.routes)
    lengths = torch.tensor([3, 6, 2])
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(8))

    def run(fwd) -> list[torch.Tensor]:  # noqa: ANN001
        cache = KVCache(model.config, batch_size=3, max_len=24, kv8=kv8)
        with torch.no_grad():
            out = [prefill(fwd, tokens[:, :4], lengths.clamp(max=4), cache)]
            for t in range(4):
                out.append(decode_step(fwd, tokens[torch.arange(3), lengths + t], cache))
        return out

    got = assert_fused_like_reference(run, model, fast)
    # The rotation matters: the same LUTs read without it give other logits.
    for m in model.modules():
        if isinstance(m, PalettizedLinear):
            m.in_signs = None
    assert not torch.allclose(run(FusedDecoder.from_model(model))[-1], got[-1], atol=1e-2)
