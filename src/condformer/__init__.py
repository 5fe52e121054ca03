"""condformer: conditional-computation Transformers that measurably save wall-clock time.

    import condformer as cf
    cfg = cf.preset("small")
    model = cf.build_model(cfg)
    out = model(tokens)            # out.logits, out.loss, out.aux_loss, out.stats
"""

from condformer.cache import KVCache
from condformer.config import (
    AltUpConfig,
    ExitConfig,
    LayerSpec,
    ModelConfig,
    TrainConfig,
    every_other,
    load_config_file,
)
from condformer.errors import CondformerError, ConfigError
from condformer.exits.heads import set_exit_thresholds
from condformer.flops import count_flops
from condformer.generate import SamplingConfig, generate
from condformer.model import Output, Transformer, build_model
from condformer.presets import preset, presets

__version__ = "0.1.0"

__all__ = [
    "AltUpConfig", "CondformerError", "ConfigError", "ExitConfig", "KVCache", "LayerSpec", "ModelConfig", "Output",
    "SamplingConfig", "TrainConfig", "Transformer", "build_model", "count_flops", "every_other", "generate",
    "load_config_file", "preset", "presets", "set_exit_thresholds",
]
