"""Adapters on disk in PEFT's format, so they move between pippin and `peft` + `transformers` both ways.

A folder holds `adapter_config.json` (PEFT's LoraConfig fields) and `adapter_model.safetensors` with PEFT's
key names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, (r, K); `lora_B`, (N, r)),
kept in fp16. pippin's own facts (the base fingerprint, what the adapter was initialised from, training
settings) go into a separate `pippin_adapter.json` that PEFT never reads. Loading validates everything a
file could get wrong (keys, shapes, ranks, finite values, unsupported PEFT features) and never unpickles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from pippin.adapters.lora import LoraConfig, LoRALinear, lora_modules
from pippin.errors import PippinError
from pippin.io import remove, write_atomic, write_json_atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PIPPIN_FILE = "pippin_adapter.json"
_KEY = re.compile(r"^base_model\.model\.(?:model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(kw_only=True)
class Adapter:
    """One LoRA adapter in memory: per-module fp16 (A, B) pairs and scales."""

    name: str
    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module name (pippin's, e.g. 'layers.0.self_attn.q_proj') -> (A (r, K), B (N, r)) in fp16."""
    scales: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)
    """pippin_adapter.json: base_fingerprint, init_from, training summary, ..."""

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())


def adapter_from_model(model: torch.nn.Module, config: LoraConfig, *, name: str, slot: int = 0, meta: dict | None = None) -> Adapter:
    """Snapshot one slot of a model's LoRA modules (e.g. the trainable one) as an fp16 Adapter."""
    weights, scales = {}, {}
    for mod_name, m in lora_modules(model).items():
        weights[mod_name] = (m.lora_A[slot].detach().half().clone(), m.lora_B[slot].detach().half().clone())
        scales[mod_name] = float(m.lora_scale[slot])
    return Adapter(name=name, config=config, weights=weights, scales=scales, meta=dict(meta or {}))


def peft_config_dict(config: LoraConfig, *, base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def save_adapter(adapter: Adapter, path: str | Path, *, base_model: str | None = None) -> Path:
    """Write the PEFT folder file by file, each atomically. adapter_config.json is the folder's one commit point: it is
    taken back first when an adapter is overwritten and written last, so a crash in between leaves a folder that is
    refused as incomplete, never new weights under an old config (or the reverse)."""
    path = Path(path)
    remove(path / CONFIG_FILE)
    tensors = {}
    for mod, (A, B) in adapter.weights.items():
        tensors[f"base_model.model.model.{mod}.lora_A.weight"] = A.half().contiguous()
        tensors[f"base_model.model.model.{mod}.lora_B.weight"] = B.half().contiguous()
    write_atomic(path / WEIGHTS_FILE, st_save(tensors, metadata={"format": "pt"}))
    write_json_atomic(path / PIPPIN_FILE, {"format": "pippin-adapter", "format_version": 1, "name": adapter.name, **adapter.meta})
    write_json_atomic(path / CONFIG_FILE, peft_config_dict(adapter.config, base_model=base_model or adapter.meta.get("base_model")))
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PippinError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(obj, dict):
        raise PippinError(f"{path} must hold a JSON object.")
    return obj


_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _patterns(raw: dict[str, Any], field: str, path: Path) -> dict[str, float]:
    """PEFT's rank_pattern / alpha_pattern, validated: module names (or dotted suffixes of them), numeric values.

    PEFT compiles the keys as regexes; a key such as `([a-z_.0-9]+)+!` then backtracks exponentially in the
    length of a module name, under the GIL. The keys PEFT writes are plain names, so only those are accepted."""
    pats = raw.get(field) or {}
    if not isinstance(pats, dict):
        raise PippinError(f"{path / CONFIG_FILE}: {field} must be an object of {{module name: number}}.")
    out = {}
    for key, value in pats.items():
        if not isinstance(key, str) or len(key) > 200 or isinstance(value, bool) or not isinstance(value, int | float):
            raise PippinError(f"{path / CONFIG_FILE}: {field} entry {key!r}: {value!r} is not a short module name and a number.")
        if not _MODULE_NAME.fullmatch(key):
            raise PippinError(
                f"{path / CONFIG_FILE}: {field} key {key!r} is not a module name; pippin takes names such as "
                "'q_proj' or 'layers.3.mlp.down_proj' there, not regular expressions."
            )
        out[key] = float(value)
    return out


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """A key matches a module name that is it or ends in '.' + it (PEFT's matching, for plain names)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def read_config(path: Path) -> LoraConfig:
    cfg = _read_json(path / CONFIG_FILE)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PippinError(f"{path}: only LoRA adapters are supported, this is {cfg.get('peft_type')}.")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise PippinError(f"{path}: PEFT option {key}={cfg[key]!r} is not supported by pippin (needs {ok!r}).")
    if cfg.get("modules_to_save"):
        raise PippinError(f"{path}: modules_to_save ({cfg['modules_to_save']}) is not supported; pippin adapters are LoRA only.")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # PEFT allows a regex string; the tensors decide what is really targeted
        targets = [targets]
    try:
        return LoraConfig(
            rank=int(cfg["r"]),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=tuple(targets) or ("?",),
            use_rslora=bool(cfg.get("use_rslora", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PippinError(f"{path / CONFIG_FILE}: invalid LoRA config ({e}).") from None


def load_adapter(path: str | Path, *, name: str | None = None) -> Adapter:
    """Read and validate a PEFT LoRA folder into fp16 tensors (no model needed; see check_compatible)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise PippinError(f"{path} is not an adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
    config = read_config(path)
    raw = _read_json(path / CONFIG_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                m = _KEY.match(key)
                if m is None:
                    raise PippinError(f"{path / WEIGHTS_FILE}: unexpected tensor {key!r} (not a LoRA A/B weight).")
                pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except PippinError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise PippinError(f"{path / WEIGHTS_FILE} is corrupt or not safetensors ({e}).") from None
    if not pairs:
        raise PippinError(f"{path / WEIGHTS_FILE} holds no LoRA weights.")
    weights, scales = {}, {}
    alpha_pat, rank_pat = _patterns(raw, "alpha_pattern", path), _patterns(raw, "rank_pattern", path)
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise PippinError(f"{path}: module {mod} has lora_{'A' if 'A' in ab else 'B'} but not its pair.")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise PippinError(f"{path}: module {mod} has mismatched LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)}.")
        A, B = A.half(), B.half()  # served in fp16: a finite fp32 weight past 65504 becomes inf here, so check after
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise PippinError(f"{path}: module {mod} has LoRA weights that are not finite in fp16 (corrupt, diverged, or beyond ±65504).")
        r = A.shape[0]
        alpha = _pattern_value(alpha_pat, mod, config.alpha)
        expected_r = int(_pattern_value(rank_pat, mod, config.rank))
        if r != expected_r:
            raise PippinError(f"{path}: module {mod} has rank {r} but the config says {expected_r}.")
        weights[mod] = (A, B)
        scales[mod] = alpha / (r**0.5 if config.use_rslora else r)
    meta = _read_json(path / PIPPIN_FILE) if (path / PIPPIN_FILE).is_file() else {}
    meta.pop("format", None), meta.pop("format_version", None)
    stored_name = meta.pop("name", None)
    return Adapter(name=name or stored_name or path.name, config=config, weights=weights, scales=scales, meta=meta)


def check_compatible(adapter: Adapter, model: torch.nn.Module, *, fingerprint: str | None = None, max_rank: int | None = None) -> None:
    """Refuse an adapter whose modules, shapes, rank or recorded base do not match this model."""
    mods: dict[str, LoRALinear] = lora_modules(model)
    for mod, (A, B) in adapter.weights.items():
        m = mods.get(mod)
        if m is None:
            raise PippinError(
                f"Adapter {adapter.name!r} targets {mod}, which this model does not have as a LoRA module "
                f"(it has {len(mods)} LoRA modules, e.g. {next(iter(mods), 'none')})."
            )
        if A.shape[1] != m.in_features or B.shape[0] != m.out_features:
            raise PippinError(
                f"Adapter {adapter.name!r} does not fit this base at {mod}: A {tuple(A.shape)}, B {tuple(B.shape)} vs "
                f"a {m.in_features} -> {m.out_features} layer. It was trained for a different model."
            )
        cap = max_rank or m.rank
        if A.shape[0] > cap:
            raise PippinError(f"Adapter {adapter.name!r} has rank {A.shape[0]} at {mod}; this model's LoRA slots hold rank <= {cap}.")
    want = adapter.meta.get("base_fingerprint")
    if fingerprint is not None and want is not None and want != fingerprint:
        raise PippinError(
            f"Adapter {adapter.name!r} was trained on base {adapter.meta.get('base_model', '?')} (fingerprint {want}), "
            f"not on this one ({fingerprint}); load the base it was made for."
        )
