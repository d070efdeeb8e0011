import math

import pytest
import torch
import torch.nn.functional as F

from pippin.errors import PippinError
from pippin.model.config import get_preset
from pippin.model.transformer import Transformer
from pippin.train.adastar import Adastar, clip_or_skip_
from pippin.train.losses import distill_loss
from pippin.train.optim import OptimConfig, afm_adastar, build_optimizer, clip_grads_, lr_at, mup_simple_scale, set_lr


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    c = OptimConfig(lr=2.0, warmup_steps=4, total_steps=104, final_lr_ratio=0.005)
    assert [lr_at(i, c) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lr_at(4, c) == pytest.approx(2.0)
    assert lr_at(54, c) == pytest.approx(0.01 + (2.0 - 0.01) * 0.5)  # halfway down the cosine
    assert lr_at(104, c) == pytest.approx(0.01) and lr_at(10_000, c) == pytest.approx(0.01)
    mid = 4 + 25
    assert lr_at(mid, c) == pytest.approx(0.01 + 1.99 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_weight_decay_skips_vectors_and_unknown_names_are_refused():
    lin = torch.nn.Linear(3, 2)
    opt = build_optimizer(lin.named_parameters(), OptimConfig(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(lin.weight)}
    with pytest.raises(PippinError, match="not one of"):
        OptimConfig(name="lion")


def test_distill_loss_is_cross_entropy_against_the_mixed_one_hot_target():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -100
    target = 0.9 * F.one_hot(t.argmax(-1), 11) + 0.1 * F.one_hot(y.clamp_min(0), 11)
    keep = y != -100
    ref = -(target * F.log_softmax(s, -1)).sum(-1)[keep].mean()
    assert distill_loss(s, t.argmax(-1), y).item() == pytest.approx(ref.item(), rel=1e-6)
    assert distill_loss(s, t.argmax(-1), y, teacher_weight=0.0).item() == pytest.approx(F.cross_entropy(s.view(-1, 11), y.view(-1)).item())


# --- adastar (AFM's optimizer) ------------------------------------------------------------------------------------


def adastar_reference(p, grads, lrs, *, peak, b1=None, b2=0.95, eps=0.0, eps_sq=1e-30, clip=1.0, b3=0.95, debias3=False, wd=0.0, scale=1.0):
    """One tensor, written from AXLearn's formulas (afm.md 2.3) with no shared code; returns the params and how often
    the clip was active."""
    m, v, s, clipped = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), 0
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        v = b2 * v + (1 - b2) * (g * g + eps_sq)
        vhat = v / (1 - b2**t)
        if b1 is None:
            mhat = g
        else:
            m = b1 * m + (1 - b1) * g
            mhat = m / (1 - b1**t)
        u = mhat / (vhat.sqrt() + eps)
        if clip is not None:
            rms = u.pow(2).mean().sqrt()
            clipped += int(rms > clip)
            u = u / max(1.0, rms.item() / clip)
        if b3 is not None:
            s = b3 * s + (1 - b3) * u
            u = s / (1 - b3**t) if debias3 else s
        p = p - lr * scale * u - (lr / peak) * wd * p
    return p, clipped


def run_adastar(p0, grads, lrs, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = Adastar([p], lr=lrs[0], peak_lr=max(lrs), **kw)
    for g, lr in zip(grads, lrs):
        set_lr(opt, lr)
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def spiky_grads(n=12, shape=(6, 5)):
    """Gradients whose scale jumps (x20 at step 6), so the normalized update's RMS exceeds 1 and the clip acts."""
    torch.manual_seed(0)
    return [torch.randn(shape, dtype=torch.float64) * (20.0 if i == 6 else 1.0 + 0.1 * i) for i in range(n)]


@pytest.mark.parametrize(
    "kw",
    [
        dict(weight_decay=0.1, update_scale=0.25),  # AFM's golden config (clip 1, update EMA 0.95 not debiased)
        dict(gradient_ema_decay=0.9, update_ema_debias=True, raw_update_clip=0.5, eps=1e-3, weight_decay=0.05),
    ],
)
def test_adastar_matches_a_hand_written_single_tensor_reference(kw):
    grads = spiky_grads()
    lrs = [lr_at(i, OptimConfig(lr=0.1, warmup_steps=3, total_steps=12)) for i in range(12)]
    p0 = torch.randn(6, 5, dtype=torch.float64)
    got, opt = run_adastar(p0, grads, lrs, **kw)
    names = dict(weight_decay="wd", update_scale="scale", gradient_ema_decay="b1", update_ema_debias="debias3", raw_update_clip="clip")
    ref, clipped = adastar_reference(p0, grads, lrs, peak=0.1, **{names.get(k, k): v for k, v in kw.items()})
    assert clipped >= 1  # the clip was active on at least one step
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"].item() == 12 and state["gradient_square_ema"].shape == (6, 5)
    assert ("gradient_ema" in state) == ("gradient_ema_decay" in kw) and "update_ema" in state


def test_adastar_with_a_first_moment_and_no_update_ema_or_clip_is_torch_adamw():
    """AXLearn's first special case: gradient_ema=b1 (debiased), square EMA b2 (debiased), eps outside the root,
    no clip, no update EMA. torch's AdamW decays by lr * wd; adastar by (lr / peak) * wd, so wd_adastar = peak * wd."""
    grads = spiky_grads()
    cfg = OptimConfig(lr=0.05, warmup_steps=2, total_steps=12)
    lrs = [lr_at(i, cfg) for i in range(12)]
    p0 = torch.randn(6, 5, dtype=torch.float64)
    got, _ = run_adastar(
        p0, grads, lrs, gradient_ema_decay=0.9, gradient_square_ema_decay=0.99, eps=1e-8, eps_square=0.0,
        raw_update_clip=None, update_ema_decay=None, weight_decay=0.05 * 0.1,
    )  # fmt: skip
    p = torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for g, lr in zip(grads, lrs):
        set_lr(ref, lr)
        p.grad = g.clone()
        ref.step()
    torch.testing.assert_close(got, p.detach(), rtol=1e-10, atol=1e-12)


def test_adastar_without_a_first_moment_is_unfactored_adafactor_with_momentum():
    """AXLearn's second special case: Adafactor (factored=False, no relative step or parameter scale; Shazeer & Stern
    2018) with its bias-correcting decay b2_t = b2 (1 - b2^(t-1)) / (1 - b2^t) on g^2 + eps1, update clipping by RMS d,
    momentum b1 on the clipped update. Written as Adafactor, with no debiasing division anywhere."""
    grads, b1, b2, eps1, d, lr = spiky_grads(), 0.9, 0.95, 1e-30, 1.0, 0.02
    p0 = torch.randn(6, 5, dtype=torch.float64)
    got, _ = run_adastar(p0, grads, [lr] * 12, update_ema_decay=b1, gradient_square_ema_decay=b2, eps_square=eps1, raw_update_clip=d)
    p, v, mom = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, start=1):
        b2_t = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)  # 0 at t = 1: v starts at g^2 + eps1
        v = b2_t * v + (1 - b2_t) * (g * g + eps1)
        u = g / v.sqrt()
        u = u / max(1.0, u.pow(2).mean().sqrt().item() / d)
        mom = b1 * mom + (1 - b1) * u
        p = p - lr * mom
    torch.testing.assert_close(got, p, rtol=1e-12, atol=1e-12)


def test_mup_simple_scales_attention_and_ffn_updates_only():
    assert mup_simple_scale(3072) == 0.25 and mup_simple_scale(512) == 1.0
    cfg = afm_adastar(total_steps=100, dim=3072)
    assert (cfg.lr, cfg.weight_decay, cfg.eps, cfg.mup_scale, cfg.drop_grad_norm) == (1e-2, 3.16e-4, 0.0, 0.25, 100.0)
    model = Transformer(get_preset("tiny")).double()  # fp64: the step sizes below are exact
    opt = build_optimizer(model.named_parameters(), OptimConfig(name="adastar", mup_scale=0.5, weight_decay=0.1))
    scaled = {id(p) for g in opt.param_groups if g["update_scale"] == 0.5 for p in g["params"]}
    want = {
        id(p)
        for n, p in model.named_parameters()
        if n.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    assert scaled == want and len(want) == 14
    # The scale multiplies the step: one adastar step on a scaled weight moves it half as far as an unscaled one.
    w = model.layers[0].mlp.up_proj.weight
    gain = model.layers[0].input_layernorm.weight  # unscaled, not decayed, every entry has a gradient
    before_w, before_g = w.detach().clone(), gain.detach().clone()
    model(torch.randint(0, 256, (2, 8))).logsumexp(-1).mean().backward()
    opt.step()
    rms = lambda d: d.pow(2).mean().sqrt().item()  # noqa: E731
    # Step 1: u = g / |g| (entries +-1, RMS 1), update EMA 0.05 u, weight decay 0.1 * p.
    assert rms(w.detach() - before_w * (1 - 0.1)) == pytest.approx(1e-3 * 0.5 * 0.05, rel=1e-4)
    assert rms(gain.detach() - before_g) == pytest.approx(1e-3 * 0.05, rel=1e-4)


def test_clip_grads_clips_normal_steps_and_skips_anomalous_ones():
    cfg = OptimConfig(name="adastar", max_grad_norm=1.0, drop_grad_norm=100.0)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([4.0, 0.0, 0.0, 0.0])
    out = clip_grads_([a, b], cfg)
    assert out.norm == pytest.approx(5.0) and not out.skip
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    for bad in (torch.tensor([60.0, 80.0, 0.0]), torch.tensor([float("nan"), 0.0, 0.0])):
        a.grad = bad.clone()
        out = clip_grads_([a, b], cfg)
        assert out.skip and (math.isnan(out.norm) or out.norm >= 100.0)
        assert torch.equal(a.grad, bad) or torch.isnan(a.grad[0])  # a skipped step leaves the gradients alone
    # The caller's loop: a skipped step changes neither weights nor optimizer state.
    opt = build_optimizer([("a", a), ("b", b)], cfg)
    a.grad = torch.tensor([600.0, 0.0, 0.0])
    if not clip_grads_([a, b], cfg).skip:
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(3)) and not opt.state


def _sharded_adastar(rank, init_file, out_file):
    """One of 2 gloo ranks: the same adastar run as `test_adastar_on_sharded_dtensors_...` on Shard(0) DTensors."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{init_file}")
    mesh = init_device_mesh("cpu", (2,))
    p0, grads = dtensor_case()
    p = torch.nn.Parameter(distribute_tensor(p0, mesh, [Shard(0)]))
    opt = Adastar([p], lr=0.05, raw_update_clip=0.5, weight_decay=0.1)
    norms = []
    for g in grads:
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        norms.append(clip_or_skip_([p], max_norm=1.0, drop_norm=100.0).norm)
        opt.step()
    full = p.full_tensor()
    assert isinstance(opt.state[p]["update_ema"], DTensor)
    if rank == 0:
        save_file({"p": full.detach(), "norms": torch.tensor(norms)}, out_file)
    dist.destroy_process_group()


def dtensor_case():
    torch.manual_seed(1)
    return torch.randn(8, 3), [torch.randn(8, 3) * (10.0 if i == 3 else 1.0) for i in range(6)]


def test_adastar_and_clip_on_sharded_dtensors_match_plain_tensors(tmp_path):
    """2 CPU ranks (gloo), parameter sharded by rows: the clip's RMS and the global norm must cover both shards."""
    from safetensors.torch import load_file

    torch.multiprocessing.start_processes(
        _sharded_adastar, args=(str(tmp_path / "init"), str(tmp_path / "out.safetensors")), nprocs=2, start_method="fork"
    )
    got = load_file(str(tmp_path / "out.safetensors"))
    p0, grads = dtensor_case()
    p = torch.nn.Parameter(p0.clone())
    opt = Adastar([p], lr=0.05, raw_update_clip=0.5, weight_decay=0.1)
    norms = []
    for g in grads:
        p.grad = g.clone()
        norms.append(clip_or_skip_([p], max_norm=1.0, drop_norm=100.0).norm)
        opt.step()
    torch.testing.assert_close(got["p"], p.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["norms"], torch.tensor(norms), rtol=1e-6, atol=0.0)
