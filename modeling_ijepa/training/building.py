"""Building the pretraining model, its config and the optimizer's parameter groups from the run arguments."""

from __future__ import annotations

import logging
import os

from .arguments import ModelArguments, parse_config_overrides

logger = logging.getLogger(__name__)


def build_config(model_args: ModelArguments):
    from .. import PRESETS, IJepaConfig, ijepa_config_from_preset

    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path and model_args.config_name in PRESETS and not overrides:
        return IJepaConfig.from_pretrained(model_args.model_name_or_path)
    if model_args.config_name in PRESETS:
        return ijepa_config_from_preset(model_args.config_name, **overrides)
    if os.path.exists(model_args.config_name):
        config = IJepaConfig.from_pretrained(model_args.config_name)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"--config_overrides: IJepaConfig has no field {key!r}.")
            setattr(config, key, value)
        config.validate_ijepa()
        return config
    raise ValueError(
        f"--config_name {model_args.config_name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
        "config file/folder."
    )


def build_model(model_args: ModelArguments, config):
    from .. import IJepaForPreTraining

    if not model_args.model_name_or_path:
        model = IJepaForPreTraining(config)
        model.set_attn_implementation(model_args.attn_implementation)
    else:
        model, info = IJepaForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, output_loading_info=True,
            attn_implementation=model_args.attn_implementation,
        )
        if any(key.startswith("context_encoder.") for key in info["missing_keys"]):
            # An encoder-only checkpoint (e.g. facebook/ijepa_vith14_1k) loads into the target encoder only: start the
            # context encoder from the same weights, as the official code deep-copies encoder -> target encoder.
            logger.info("Checkpoint has no context encoder: copying its encoder into the context encoder.")
            model.context_encoder.load_state_dict(model.ijepa.state_dict())
    if model_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if model_args.torch_compile:
        from ..compilation import compile_regions

        # Per layer, in place (parameter names unchanged): static target encoder, token dim dynamic elsewhere.
        compile_regions(model)
    return model


def optimizer_param_groups(model) -> list[dict]:
    """Official `init_opt` grouping: no weight decay on biases and 1-D parameters (norms); everything else decays
    (including the 3-D predictor mask token). The frozen target encoder and fixed tables are not in the optimizer."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or param.ndim == 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]
