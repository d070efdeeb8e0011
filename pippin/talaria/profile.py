"""Measured latency on this machine's real kernels: Talaria's `measured_*` columns and the engine's own step times.

`profile_ops(model, rows, steps=...)` times every op of an `ops_table` on the code the engine runs for it, in execution
order (so each op finds the caches as a real step leaves them), each op timed alone once per repeat; medians and
interquartile ranges over the repeats. Decode (one row): where the fused decoder takes the model (FusedDecoder), each op
on its kernel (`rms_norm`, `gemv`, the LUT and act8 matvecs through PalettizedLinear, `silu_mul`, the int8 head); else
the model's modules. Prefill (N rows from an empty cache, the head on the last row only): the model's modules, as the
engine's prefill runs them. Attention has no kernel of its own (the fused step runs it inside one C++ call), so its
decode time is the engine's whole decode step at context L minus the step at context 1, shared equally by the layers
(it leaves out RoPE and attention over one key, well under a microsecond), and its prefill time is the attention
module's minus its four projections (without the cache write). The engine's own decode step and prefill are timed too.
Per-op calls each pay Python's dispatch (a few µs) that the fused step does not: compare their sum with the step.
`build_model(cfg, plan)` gives a model stored as a plan with random indices, LUTs and weights (latency depends on shapes
and widths only): its values are not calibrated, never use it for quality. The engine's steps and KV cache are handed
in (`EngineSteps`): talaria does not import the engine.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pippin.errors import PippinError
from pippin.kernels import ops
from pippin.kernels.decoder import FusedDecoder
from pippin.model.config import ModelConfig
from pippin.model.transformer import TiedLinear, Transformer
from pippin.quant.compress import apply_structure_
from pippin.quant.linear import Int8Embedding, PalettizedLinear
from pippin.quant.rotate import RotatedHead
from pippin.talaria.ops import OpKind, OpRow
from pippin.talaria.plan import Plan, is_linear


@dataclass(kw_only=True)
class EngineSteps:
    """The engine's forward passes and KV cache (pippin.engine.generate's `prefill` and `decode_step`, a `KVCache`
    factory), passed in: the profiler times what the engine runs without importing it (tests/test_layering.py)."""

    new_cache: Callable[[ModelConfig, int, bool], Any]
    """(config, max_len, kv8) -> an empty batch-1 KV cache."""
    prefill: Callable[..., torch.Tensor]
    """prefill(forward, tokens (B, T), lengths (B,), cache) -> logits at each row's last token."""
    decode_step: Callable[..., torch.Tensor]
    """decode_step(forward, tokens (B,), cache) -> logits of one new token per row."""


@dataclass(kw_only=True)
class Timing:
    """Seconds of one call over repeats: median and quartiles."""

    median_s: float
    q1_s: float
    q3_s: float
    repeats: int

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        if not samples:
            raise PippinError("No timing samples: profile with at least one repeat.")
        if len(samples) == 1:
            return cls(median_s=samples[0], q1_s=samples[0], q3_s=samples[0], repeats=1)
        q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median_s=q2, q1_s=q1, q3_s=q3, repeats=len(samples))


@dataclass(kw_only=True)
class Profile:
    """A model's measured latency: per op (by name) for decode and prefill, and the engine's own steps."""

    context: int
    prefill_tokens: int
    fused: bool
    """Decode ran on the fused kernels (else the model's modules)."""
    threads: int
    dispatch_s: float = 0.0
    """Seconds of one call of a kernel on 8 values: what each per-op decode call pays on top of its work (the fused step
    pays none of it)."""
    decode: dict[str, Timing] = field(default_factory=dict)
    prefill: dict[str, Timing] = field(default_factory=dict)
    decode_step: Timing
    """The engine's decode step at the context length (one token, batch 1)."""
    prefill_step: Timing
    """The engine's prefill of the prefill tokens from an empty cache."""

    def op_sum(self, phase: str) -> float:
        """Sum of the per-op medians of 'decode' or 'prefill'."""
        return sum(t.median_s for t in getattr(self, phase).values())

    def summary(self) -> dict[str, Any]:
        """The engine's step times and the per-op sums (seconds), for a table's header and JSON."""
        d, p = self.decode_step, self.prefill_step
        return {
            "context": self.context,
            "prefill_tokens": self.prefill_tokens,
            "fused": self.fused,
            "threads": self.threads,
            "dispatch_s": self.dispatch_s,
            "repeats": {"decode": d.repeats, "prefill": p.repeats},
            "decode_step_s": d.median_s,
            "decode_step_iqr_s": d.iqr_s,
            "decode_op_sum_s": self.op_sum("decode"),
            "prefill_step_s": p.median_s,
            "prefill_step_iqr_s": p.iqr_s,
            "prefill_op_sum_s": self.op_sum("prefill"),
        }


def with_measured(rows: list[OpRow], profile: Profile) -> list[OpRow]:
    """Copies of the rows with their measured columns filled from the profile (every row must have been profiled)."""
    missing = [r.name for r in rows if r.name not in profile.decode or r.name not in profile.prefill]
    if missing:
        raise PippinError(f"The profile has no timing for {missing[:3]}; profile the model this table describes.")
    out = []
    for r in rows:
        d, p = profile.decode[r.name], profile.prefill[r.name]
        measured = {"measured_decode_s": d.median_s, "measured_decode_iqr_s": d.iqr_s, "measured_prefill_s": p.median_s}
        measured |= {"measured_prefill_iqr_s": p.iqr_s, "measured_repeats": min(d.repeats, p.repeats)}
        out.append(dataclasses.replace(r, **measured))
    return out


# --- a model stored as a plan, with random values ------------------------------------------------------------------


def quantization_record(plan: Plan) -> dict[str, Any]:
    """The config.json `quantization` record of a model stored as `plan` (what `apply_structure_` reads)."""
    embed = plan.bits["embed_tokens"]
    return {
        "method": "palettize",
        "group_size": plan.group_size,
        "plan": plan.compress_plan(),
        "embedding": {8: "int8", 4: "palette4", 6: "palette6"}.get(embed, "dense"),
        "embedding_row_scale": plan.embed_row_scale,
        "row_scale": plan.row_scale,
        "act8": plan.act8,
        "kv8": plan.kv_bits == 8,
        "rotation": {"method": "hadamard", "seed": 0, "down_input": plan.rotated_inputs} if plan.rotated else None,
    }


@torch.no_grad()
def build_model(cfg: ModelConfig, plan: Plan, *, seed: int = 0) -> Transformer:
    """A model with `cfg`'s shapes stored as `plan`: the compressed modules pippin loads (`apply_structure_`), filled with
    random packed indices and sorted random LUTs, int8 rows and small random dense weights. Not calibrated: for timing
    only. Dense 16-bit weights are bf16. A plan with an 8-bit KV cache is run with `kv8=plan.kv_bits == 8` by the caller."""
    if plan.act_bits != 32 or plan.kv_bits not in (8, 32):
        raise PippinError(f"pippin's CPU engine runs fp32 activations and a 32- or 8-bit KV cache, not {plan.act_bits} / {plan.kv_bits}.")
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    apply_structure_(model, quantization_record(plan))
    if isinstance(model.lm_head, RotatedHead):
        model.lm_head.rebuild()
    for m in model.modules():
        if isinstance(m, PalettizedLinear):  # and PalettizedEmbedding: random indices (every byte pattern is valid)
            m.packed.copy_(torch.randint(0, 256, m.packed.shape, generator=gen, dtype=torch.uint8))
            m.lut.copy_((torch.randn(m.lut.shape, generator=gen) * 0.02).sort(1).values.half())
        elif isinstance(m, Int8Embedding):
            m.qweight.copy_(torch.randint(-127, 128, m.qweight.shape, generator=gen, dtype=torch.int8))
            m.scale.fill_(0.01)
    for name, b in plan.bits.items():
        if b == 16 and (is_linear(name) or name == "embed_tokens"):
            model.get_submodule(name).to(torch.bfloat16)
    return model.eval()


# --- timing ----------------------------------------------------------------------------------------------------------


def _kernel_decode_calls(model: Transformer, rows: list[OpRow], x: dict[int, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """One call per op (attention aside) for a one-row decode on the fused decoder's kernels. x: an input per width."""
    k = ops()
    calls: dict[str, Callable[[], Any]] = {}
    tok = torch.zeros(1, 1, dtype=torch.long)
    mods = dict(model.named_modules())
    for r in rows:
        m = mods.get(r.name)
        if r.kind == OpKind.EMBEDDING:
            calls[r.name] = lambda m=m: m(tok)
        elif r.kind == OpKind.NORM:
            calls[r.name] = lambda m=m: k.rms_norm(x[m.weight.shape[0]], m.weight, m.eps)
        elif r.kind == OpKind.LINEAR:
            if type(m) is nn.Linear:  # dense projections: the kernels' matvec (fp32 / fp16 / bf16)
                calls[r.name] = lambda m=m: k.gemv(x[m.in_features], m.weight)
            else:
                calls[r.name] = lambda m=m: m(x[m.in_features])  # PalettizedLinear: lut_gemv or lut_gemv_act8
        elif r.kind == OpKind.ACTIVATION:
            g = x[model.config.ffn_dim]
            calls[r.name] = lambda g=g: k.silu_mul(g, g)
        elif r.kind == OpKind.HEAD:
            calls[r.name] = _head_call(model, r.name, x[model.config.dim], fused=True)
    return calls


def _head_call(model: Transformer, name: str, h: torch.Tensor, *, fused: bool) -> Callable[[], Any]:
    """The output projection as FusedDecoder.head runs it (a dense head on the kernels' matvec, else the head module);
    a rotated head's `lm_head.mix` (x @ M) and the head behind it are two ops."""
    head = model.lm_head
    rotated = isinstance(head, RotatedHead)
    if name == "lm_head.mix":
        return lambda: h @ head.mix
    inner = head.head if rotated else head
    dense = type(inner) in (TiedLinear, nn.Linear) and inner.weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if fused and dense:
        w = inner.weight
        return lambda: ops().gemv(h, w)
    return lambda: inner(h)


def _module_calls(model: Transformer, rows: list[OpRow], n: int) -> dict[str, Callable[[], Any]]:
    """One call per op for n rows on the model's own modules (the engine's prefill, or decode without the kernels); the
    final norm and the head on one row when n > 1 (the engine's logits_at). Attention: the whole module (see _attention)."""
    cfg = model.config
    calls: dict[str, Callable[[], Any]] = {}
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    x = {w: torch.randn(1, n, w, generator=gen) for w in {cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.head_dim}}
    last = {w: t[:, -1] for w, t in x.items()}
    heads = {"q_norm": cfg.n_heads, "k_norm": cfg.n_kv_heads}
    positions = torch.arange(n).view(1, n)
    cos, sin = model.rope_cos[positions].unsqueeze(1), model.rope_sin[positions].unsqueeze(1)
    tokens = torch.zeros(1, n, dtype=torch.long)
    for r in rows:
        m = mods.get(r.name.removesuffix(".attention"))
        if r.kind == OpKind.EMBEDDING:
            calls[r.name] = lambda m=m: m(tokens)
        elif r.kind == OpKind.NORM and r.name == "norm":
            calls[r.name] = lambda m=m: m(last[cfg.dim])
        elif r.kind == OpKind.NORM:
            short = r.name.rsplit(".", 1)[-1]
            xin = x[cfg.head_dim].expand(1, heads[short], n, cfg.head_dim) if short in heads else x[cfg.dim]
            calls[r.name] = lambda m=m, xin=xin: m(xin)
        elif r.kind == OpKind.LINEAR:
            xin = x[m.in_features].to(_dtype(m))
            calls[r.name] = lambda m=m, xin=xin: m(xin)
        elif r.kind == OpKind.ATTENTION:
            calls[r.name] = lambda m=m: m(x[cfg.dim], cos, sin, None, None)
        elif r.kind == OpKind.ACTIVATION:
            g = x[cfg.ffn_dim]
            calls[r.name] = lambda g=g: F.silu(g) * g  # as MLP.forward
        elif r.kind == OpKind.HEAD:
            calls[r.name] = _head_call(model, r.name, last[cfg.dim], fused=False)
    return calls


def _dtype(m: nn.Module) -> torch.dtype:
    w = getattr(m, "weight", None) if type(m) is nn.Linear else None
    return torch.float32 if w is None else w.dtype


def _time_in_order(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Per op, the seconds of one call in each of `repeats` passes over every op in order (after one warm-up pass)."""
    for fn in calls.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return samples


def _attention_prefill(samples: dict[str, list[float]], rows: list[OpRow]) -> None:
    """Turn each attention module's samples into attention alone: minus its four projections, per repeat."""
    for r in rows:
        if r.kind == OpKind.ATTENTION:
            pre = r.name.removesuffix(".attention")
            projs = [samples[f"{pre}.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            samples[r.name] = [max(0.0, a - sum(p)) for a, *p in zip(samples[r.name], *projs, strict=True)]


@dataclass(kw_only=True)
class StepTimes:
    """The engine's own steps: decode at the context length and at context 1 (interleaved), and the prefill."""

    decode_samples: list[float]
    decode_at_1_samples: list[float]
    prefill_samples: list[float]

    @property
    def decode(self) -> Timing:
        return Timing.of(self.decode_samples)

    @property
    def prefill(self) -> Timing:
        return Timing.of(self.prefill_samples)


def _check(cfg: ModelConfig, context: int, prefill: int, decode_repeats: int, prefill_repeats: int) -> None:
    if not 1 <= context <= cfg.max_seq_len or not 1 <= prefill <= cfg.max_seq_len:
        raise PippinError(f"Context {context} and prefill {prefill} must be between 1 and the model's {cfg.max_seq_len} positions.")
    if decode_repeats < 1 or prefill_repeats < 1:
        raise PippinError("Profile with at least one repeat for decode and for prefill.")


@torch.inference_mode()
def time_steps(
    model: Transformer,
    *,
    steps: EngineSteps,
    context: int = 512,
    prefill: int = 512,
    kv8: bool = False,
    decode_repeats: int = 20,
    prefill_repeats: int = 5,
    forward: FusedDecoder | None = None,
    skip_prefill: bool = False,
) -> StepTimes:
    """Time the engine's decode step (one token, batch 1, attending to `context` tokens; and the same step at context 1)
    and its prefill of `prefill` tokens from an empty cache (unless skip_prefill), on the fused decoder as the engine
    builds it. After one warm-up each; the cache holds zeros (values do not change the work)."""
    cfg = model.config
    _check(cfg, context, prefill, decode_repeats, prefill_repeats)
    fwd = forward or FusedDecoder.from_model(model)
    cache = steps.new_cache(cfg, context, kv8)
    tok = torch.zeros(1, dtype=torch.long)

    def step_at(n: int) -> float:
        cache.lengths = torch.tensor([n - 1])  # the new token goes to slot n - 1 and attends to slots 0..n-1
        t = time.perf_counter()
        steps.decode_step(fwd, tok, cache)
        return time.perf_counter() - t

    step_at(context), step_at(1)
    at_l, at_1 = [], []
    for _ in range(decode_repeats):
        at_l.append(step_at(context))
        at_1.append(step_at(1))
    full: list[float] = []
    if skip_prefill:
        return StepTimes(decode_samples=at_l, decode_at_1_samples=at_1, prefill_samples=full)
    tokens, lengths = torch.zeros(1, prefill, dtype=torch.long), torch.tensor([prefill])
    pcache = steps.new_cache(cfg, prefill, kv8)
    steps.prefill(fwd, tokens, lengths, pcache)
    for _ in range(prefill_repeats):
        t = time.perf_counter()
        steps.prefill(fwd, tokens, lengths, pcache)
        full.append(time.perf_counter() - t)
    return StepTimes(decode_samples=at_l, decode_at_1_samples=at_1, prefill_samples=full)


@torch.inference_mode()
def profile_ops(
    model: Transformer,
    rows: list[OpRow],
    *,
    steps: EngineSteps,
    context: int = 512,
    prefill: int = 512,
    kv8: bool = False,
    decode_repeats: int = 20,
    prefill_repeats: int = 5,
    progress: bool = False,
) -> Profile:
    """Time every op of `rows` (an `ops_table` of this model, built with the same context and prefill) for decode and
    prefill on the code the engine runs, and the engine's decode step and prefill. See the module docstring."""
    cfg = model.config
    _check(cfg, context, prefill, decode_repeats, prefill_repeats)
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise PippinError("The table names an op twice; profile an ops_table of this model.")
    fwd = FusedDecoder.from_model(model)
    gen = torch.Generator().manual_seed(0)
    widths = {cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.vocab_size}
    x1 = {w: torch.randn(1, w, generator=gen) for w in widths}
    bar = tqdm(total=3, desc="profile", disable=not progress)
    dispatch = 0.0
    if ops() is not None:
        x8 = torch.zeros(1, 8)
        dispatch = Timing.of(_time_in_order({"call": lambda: ops().silu_mul(x8, x8)}, 200)["call"]).median_s
    no_attention = [r for r in rows if r.kind != OpKind.ATTENTION]
    calls = _kernel_decode_calls(model, no_attention, x1) if fwd.fused else _module_calls(model, no_attention, 1)
    decode = _time_in_order(calls, decode_repeats)
    bar.update()
    kw = {"context": context, "prefill": prefill, "kv8": kv8, "decode_repeats": decode_repeats, "prefill_repeats": prefill_repeats}
    st = time_steps(model, steps=steps, forward=fwd, **kw)
    # Attention over L keys, per layer: the step at context L minus the step at context 1, repeat by repeat.
    per_layer = [max(0.0, a - b) / cfg.n_layers for a, b in zip(st.decode_samples, st.decode_at_1_samples, strict=True)]
    for r in rows:
        if r.kind == OpKind.ATTENTION:
            decode[r.name] = per_layer
    bar.update()
    samples = _time_in_order(_module_calls(model, rows, prefill), prefill_repeats)
    _attention_prefill(samples, rows)
    bar.update()
    bar.close()
    return Profile(
        context=context,
        prefill_tokens=prefill,
        fused=fwd.fused,
        threads=torch.get_num_threads(),
        dispatch_s=dispatch,
        decode={n: Timing.of(s) for n, s in decode.items()},
        prefill={n: Timing.of(s) for n, s in samples.items()},
        decode_step=st.decode,
        prefill_step=st.prefill,
    )
