"""What Talaria prices: a preset or a model folder, read as a config and a `Plan` without loading any weights.

A preset is dense fp32 (as pippin stores full-precision models). A pippin folder's config.json gives the architecture
and, for a compressed model, its `quantization` record, which is replayed on the meta device (`apply_structure_`, the
one reader of that record) to read each op's storage from the modules; a Hugging Face folder's config.json gives the
architecture alone. The folder's stored sensitivities, if any, sit next to it (see pippin.talaria.quality).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pippin.errors import PippinError
from pippin.model.checkpoint import DEFAULT_MODEL, config_from_hf, pippin_home
from pippin.model.config import PRESETS, ModelConfig, get_preset
from pippin.talaria.plan import Plan, plan_from_config, plan_from_model, skeleton


@dataclass(kw_only=True)
class ModelSource:
    name: str
    """How the model was named (a preset or a folder path)."""
    config: ModelConfig
    plan: Plan
    """How the model is stored now."""
    folder: Path | None = None


def open_model(spec: str | None) -> ModelSource:
    """A preset name, a model folder, or None / 'default' (the converted default model, else its preset shape)."""
    if spec in (None, "default", DEFAULT_MODEL):
        folder = pippin_home() / "models" / DEFAULT_MODEL
        spec = str(folder) if (folder / "config.json").is_file() else "smollm2-135m"
    if spec in PRESETS:
        cfg = get_preset(spec)
        return ModelSource(name=f"{spec} (preset)", config=cfg, plan=plan_from_config(cfg))
    folder = Path(spec).expanduser()
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise PippinError(f"{spec} is neither a preset ({', '.join(sorted(PRESETS))}) nor a model folder with a config.json.")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PippinError(f"Cannot read {cfg_file}: {e}.") from e
    if not isinstance(raw, dict):
        raise PippinError(f"{cfg_file} must hold a JSON object.")
    try:
        if raw.get("format") != "pippin":
            cfg = config_from_hf(raw)
            return ModelSource(name=str(folder), config=cfg, plan=plan_from_config(cfg), folder=folder)
        cfg = ModelConfig.from_dict(raw["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise PippinError(f"{cfg_file} does not describe a model architecture ({e}).") from None
    quant = raw.get("quantization")
    kv_bits = 8 if isinstance(quant, dict) and quant.get("kv8") else 32
    plan = plan_from_model(skeleton(cfg, quant), kv_bits=kv_bits)
    return ModelSource(name=str(folder), config=cfg, plan=plan, folder=folder)
