"""I-JEPA for Hugging Face Transformers: pretraining (context encoder, predictor, EMA target encoder), masking,
and encoders that load in plain transformers.

Importing this package registers its classes with the Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForPreTraining` and `AutoModelForImageClassification` `.from_pretrained(dir)` return them. Without the
import, plain transformers still loads this project's checkpoints as its built-in `ijepa` encoder.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_ijepa import PRESETS, IJepaConfig, ijepa_config_from_preset
from .masking_ijepa import IJepaMaskCollator, MaskSamplingSettings, sample_block_size, sample_masks
from .modeling_ijepa import (
    IJepaForImageClassification,
    IJepaForPreTraining,
    IJepaForPreTrainingOutput,
    IJepaModel,
    IJepaPredictor,
    IJepaPreTrainedModel,
    ema_momentum,
    gather_patches,
    repeat_interleave_batch,
    sincos_position_embeddings,
)

__version__ = "0.1.0"

# "ijepa" is already taken by transformers' built-in classes: replace them for this process (exist_ok=True).
AutoConfig.register("ijepa", IJepaConfig, exist_ok=True)
AutoModel.register(IJepaConfig, IJepaModel, exist_ok=True)
AutoModelForPreTraining.register(IJepaConfig, IJepaForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(IJepaConfig, IJepaForImageClassification, exist_ok=True)

# `save_pretrained` writes the modeling files and an `auto_map` next to the weights, so that
# `AutoModel*.from_pretrained(dir, trust_remote_code=True)` works where this package is not installed.
IJepaConfig.register_for_auto_class()
IJepaModel.register_for_auto_class("AutoModel")
IJepaForPreTraining.register_for_auto_class("AutoModelForPreTraining")
IJepaForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "PRESETS",
    "IJepaConfig",
    "ijepa_config_from_preset",
    "IJepaMaskCollator",
    "MaskSamplingSettings",
    "sample_block_size",
    "sample_masks",
    "IJepaForImageClassification",
    "IJepaForPreTraining",
    "IJepaForPreTrainingOutput",
    "IJepaModel",
    "IJepaPredictor",
    "IJepaPreTrainedModel",
    "ema_momentum",
    "gather_patches",
    "repeat_interleave_batch",
    "sincos_position_embeddings",
]
