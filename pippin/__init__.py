"""pippin: a small language model with many task adapters, on a device.

A PyTorch implementation of the on-device foundation-model system behind Apple Intelligence (AFM): a GQA
transformer, checkpoint loading (HF safetensors, GGUF), a fast CPU engine, and the tools around it.
The public API is deliberately small; see README.md.
"""

from pippin.api import generate, load_engine
from pippin.engine.engine import Engine, GenerationStats
from pippin.engine.sampling import SamplingParams
from pippin.errors import PippinError
from pippin.model.checkpoint import load_model
from pippin.model.config import ModelConfig, get_preset
from pippin.model.tokenizer import Tokenizer
from pippin.model.transformer import Transformer

__all__ = [
    "Engine",
    "GenerationStats",
    "ModelConfig",
    "PippinError",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "generate",
    "get_preset",
    "load_engine",
    "load_model",
]
__version__ = "0.1.0"
