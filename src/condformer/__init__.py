"""condformer: conditional-computation Transformers that measurably save wall-clock time.

    import condformer as cf
    cfg = cf.preset("small")
    model = cf.build_model(cfg)
    out = model(tokens)            # out.logits, out.loss, out.aux_loss, out.stats
"""

import condformer.components  # noqa: F401  (registers the built-in blocks, routers and FFNs first)
from condformer.cache import KVCache
from condformer.config import (
    AltUpConfig,
    ExitConfig,
    LayerSpec,
    ModelConfig,
    TrainConfig,
    every_other,
)
from condformer.config_files import load_config_file
from condformer.errors import CondformerError, ConfigError
from condformer.exits.heads import set_exit_thresholds
from condformer.flops import count_flops
from condformer.generation import SamplingConfig, generate
from condformer.layers.blocks import PreLN
from condformer.layers.simplified import SAS, SASP, Parallel
from condformer.model import Output, Transformer, build_model
from condformer.presets import preset, presets
from condformer.routing.mod import MoD
from condformer.routing.moe import MoE

__version__ = "0.1.0"

__all__ = [
    "AltUpConfig", "build_model", "CondformerError", "ConfigError", "count_flops", "every_other", "ExitConfig",
    "generate", "KVCache", "LayerSpec", "load_config_file", "MoD", "ModelConfig", "MoE", "Output", "Parallel",
    "PreLN", "preset", "presets", "SamplingConfig", "SAS", "SASP", "set_exit_thresholds", "TrainConfig",
    "Transformer",
]
