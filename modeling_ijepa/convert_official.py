"""Official I-JEPA checkpoints <-> this package's `IJepaForPreTraining`, and plain-transformers encoder exports.

The official training code (facebookresearch/ijepa, `src/train.py` `save_checkpoint`) writes one file per epoch:
a dict with the state dicts `encoder` (context encoder), `predictor` and `target_encoder` (EMA encoder), each with
its keys prefixed `module.` because the three modules are wrapped in `DistributedDataParallel`, plus training
state (`opt`, `scaler`, `epoch`, `loss`, `batch_size`, `world_size`, `lr`).

Weight names are translated by the declarative key maps `ENCODER_KEY_MAP` / `PREDICTOR_KEY_MAP` below, applied
forward (official -> ours) by `official_to_ours` and in reverse by `ours_to_official`. The only non-rename is the
official fused `attn.qkv` projection, split into our `q_proj`, `k_proj`, `v_proj` (in that order along the output
dimension, as the official `Attention.forward` reshapes it) and concatenated back.

`reference_encoder_forward` / `reference_predictor_forward` compute the official models' forward pass directly from
official-format tensors (functional code written for this package); conversions compare our models against them.

This module imports only torch, transformers and this package; it is not part of the Hub custom code.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import BitImageProcessor
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .configuration_ijepa import IJepaConfig
from .masking_ijepa import MaskSamplingSettings, sample_masks
from .modeling_ijepa import IJepaForPreTraining

# Official `src/train.py`: the three modules are wrapped in DistributedDataParallel before `state_dict()`.
DDP_PREFIX = "module."

# Official checkpoint section -> attribute prefix in `IJepaForPreTraining.state_dict()`.
SECTION_PREFIXES = {"encoder": "context_encoder.", "predictor": "predictor.", "target_encoder": "ijepa."}

# Official `src/models/vision_transformer.py` constructors `vit_tiny` ... `vit_giant`: width -> attention heads.
# Heads leave no trace in the tensors, so they are looked up here (or given explicitly).
OFFICIAL_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}

# Official constructors use `partial(nn.LayerNorm, eps=1e-6)` for encoder and predictor (not stored in the file).
OFFICIAL_LAYER_NORM_EPS = 1e-6

# Evaluation preprocessing (paper Sec. 5 / Appendix C, the usual ImageNet protocol): resize the short side to
# image_size / 0.875 (256 for 224 px), center crop image_size, ImageNet mean/std, bicubic resampling.
EVAL_CROP_FRACTION = 224 / 256
EVAL_RESAMPLE_BICUBIC = 3  # PIL.Image.BICUBIC

# Absolute tolerance for float32 output comparisons between two implementations of the same math (different
# attention kernels reorder sums). Reloads of the same weights with the same code are compared exactly.
OUTPUT_ATOL = 1e-4

ENCODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)


# ---------------------------------------------------------------------------------------------------------------------
# The key maps. `{i}` is a layer index, `{p}` is `weight` or `bias`. One `ours` name: a rename. Three: the official
# fused qkv tensor split into (q, k, v) along dim 0.


@dataclass(frozen=True)
class KeyRule:
    official: str
    ours: tuple[str, ...]


def _block_rules(official_prefix: str, our_prefix: str) -> tuple[KeyRule, ...]:
    """Rules for one official `Block` (pre-norm ViT layer) <-> transformers' `IJepaLayer`."""
    o, u = official_prefix, our_prefix
    return (
        KeyRule(f"{o}.{{i}}.norm1.{{p}}", (f"{u}.{{i}}.layernorm_before.{{p}}",)),
        KeyRule(
            f"{o}.{{i}}.attn.qkv.{{p}}",
            (
                f"{u}.{{i}}.attention.q_proj.{{p}}",
                f"{u}.{{i}}.attention.k_proj.{{p}}",
                f"{u}.{{i}}.attention.v_proj.{{p}}",
            ),
        ),
        KeyRule(f"{o}.{{i}}.attn.proj.{{p}}", (f"{u}.{{i}}.attention.o_proj.{{p}}",)),
        KeyRule(f"{o}.{{i}}.norm2.{{p}}", (f"{u}.{{i}}.layernorm_after.{{p}}",)),
        KeyRule(f"{o}.{{i}}.mlp.fc1.{{p}}", (f"{u}.{{i}}.mlp.fc1.{{p}}",)),
        KeyRule(f"{o}.{{i}}.mlp.fc2.{{p}}", (f"{u}.{{i}}.mlp.fc2.{{p}}",)),
    )


# Official `VisionTransformer` <-> `IJepaModel` (used for both `encoder` and `target_encoder`).
ENCODER_KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("pos_embed", ("embeddings.position_embeddings",)),
    KeyRule("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",)),
    *_block_rules("blocks", "layers"),
    KeyRule("norm.{p}", ("layernorm.{p}",)),
)

# Official `VisionTransformerPredictor` <-> `IJepaPredictor`. (Rules are listed in the official `state_dict()` order —
# a module's own parameters before its children's — which `ours_to_official` reproduces.)
PREDICTOR_KEY_MAP: tuple[KeyRule, ...] = (
    KeyRule("mask_token", ("mask_token",)),
    KeyRule("predictor_pos_embed", ("position_embeddings",)),
    KeyRule("predictor_embed.{p}", ("input_projection.{p}",)),
    *_block_rules("predictor_blocks", "layers"),
    KeyRule("predictor_norm.{p}", ("layernorm.{p}",)),
    KeyRule("predictor_proj.{p}", ("output_projection.{p}",)),
)

KEY_MAPS = {"encoder": ENCODER_KEY_MAP, "predictor": PREDICTOR_KEY_MAP, "target_encoder": ENCODER_KEY_MAP}

_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)"}


def _template_regex(template: str) -> re.Pattern:
    pieces = re.split(r"(\{i\}|\{p\})", template)
    return re.compile("".join(_PLACEHOLDERS.get(piece, re.escape(piece)) for piece in pieces) + r"\Z")


def _match(rules: tuple[KeyRule, ...], key: str, side: str) -> tuple[KeyRule, int, dict[str, str]] | None:
    """The rule (and which of its names) matching `key` on `side` ("official" or "ours"), with its placeholders."""
    for rule in rules:
        names = (rule.official,) if side == "official" else rule.ours
        for position, template in enumerate(names):
            found = _template_regex(template).match(key)
            if found:
                return rule, position, found.groupdict()
    return None


def official_to_ours(state_dict: Mapping[str, torch.Tensor], rules: tuple[KeyRule, ...], section: str) -> dict:
    """Rename one official state dict (without `module.`) to our names; unknown keys raise."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        matched = _match(rules, key, "official")
        if matched is None:
            unknown.append(key)
            continue
        rule, _, fields = matched
        if len(rule.ours) == 1:
            converted[rule.ours[0].format(**fields)] = tensor
            continue
        if tensor.size(0) % len(rule.ours):
            raise ValueError(f"{section}.{key} has {tensor.size(0)} rows, not divisible into q, k, v projections.")
        for name, part in zip(rule.ours, tensor.chunk(len(rule.ours), dim=0)):
            converted[name.format(**fields)] = part.clone()
    if unknown:
        raise ValueError(
            f"The official '{section}' state dict has keys that no rule of the key map covers: {sorted(unknown)}. "
            "Is this an I-JEPA ViT checkpoint (facebookresearch/ijepa)? Extend the key map in "
            "modeling_ijepa/convert_official.py if the architecture differs."
        )
    return converted


def _official_order(rules: tuple[KeyRule, ...], rule: KeyRule, fields: Mapping[str, str]) -> tuple:
    """Sort key reproducing the official `state_dict()` order: rules in map order, with all rules of one layer
    (`{i}`) together, layers ascending, weight before bias."""
    index = rules.index(rule)
    layered = [position for position, r in enumerate(rules) if "{i}" in r.official]
    group = layered[0] if "{i}" in rule.official else index
    return group, int(fields.get("i", -1)), index, fields.get("p") == "bias"


def ours_to_official(state_dict: Mapping[str, torch.Tensor], rules: tuple[KeyRule, ...], section: str) -> dict:
    """The reverse of `official_to_ours` with the same rules, in the official key order; unknown or incomplete keys
    raise."""
    converted, order, unknown, consumed = {}, {}, [], set()
    for key in state_dict:
        matched = _match(rules, key, "ours")
        if matched is None:
            unknown.append(key)
            continue
        rule, position, fields = matched
        if position != 0:  # k and v are gathered together with q
            continue
        names = [name.format(**fields) for name in rule.ours]
        missing = [name for name in names if name not in state_dict]
        if missing:
            raise ValueError(f"Cannot rebuild official {section}.{rule.official.format(**fields)}: missing {missing}.")
        consumed.update(names)
        parts = [state_dict[name] for name in names]
        official_key = rule.official.format(**fields)
        converted[official_key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        order[official_key] = _official_order(rules, rule, fields)
    leftover = [key for key in state_dict if key not in consumed and key not in unknown]
    if unknown or leftover:
        raise ValueError(
            f"Our '{section}' weights have keys the key map cannot place in the official format: "
            f"{sorted(unknown + leftover)}."
        )
    return {key: converted[key] for key in sorted(converted, key=order.__getitem__)}


def strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor], section: str) -> tuple[dict, bool]:
    """Remove the `module.` prefix when every key has it; returns (state dict, whether it was there)."""
    prefixed = [key.startswith(DDP_PREFIX) for key in state_dict]
    if all(prefixed) and prefixed:
        return {key[len(DDP_PREFIX):]: value for key, value in state_dict.items()}, True
    if any(prefixed):
        raise ValueError(
            f"The official '{section}' state dict mixes keys with and without the '{DDP_PREFIX}' prefix "
            f"(e.g. {next(k for k, p in zip(state_dict, prefixed) if p)!r}); it is not a file written by "
            "the official train.py."
        )
    return dict(state_dict), False


# ---------------------------------------------------------------------------------------------------------------------
# Reading official files and inferring the architecture.


def load_official_checkpoint(path: str | Path) -> dict:
    """`torch.load` an official `.pth.tar` on CPU with `weights_only=True` (tensors, numbers, dicts only), memory-
    mapped when the file is in the zip format so that ViT-H/g files do not need their size in RAM."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Official checkpoint {path} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not the dict the official train.py saves.")
    missing = [section for section in SECTION_PREFIXES if section not in checkpoint]
    if missing:
        raise ValueError(
            f"{path} lacks {missing} (has {sorted(checkpoint)}). Official I-JEPA checkpoints hold 'encoder', "
            "'predictor' and 'target_encoder' state dicts."
        )
    return dict(checkpoint)


def official_sections(checkpoint: Mapping) -> tuple[dict[str, dict], bool]:
    """The three official state dicts without DDP prefix, and whether the file had it."""
    sections, had_prefix = {}, set()
    for section in SECTION_PREFIXES:
        sections[section], prefixed = strip_ddp_prefix(checkpoint[section], section)
        had_prefix.add(prefixed)
    if len(had_prefix) != 1:
        raise ValueError("Some official state dicts have the 'module.' prefix and others not; fix the file first.")
    return sections, had_prefix.pop()


def _count_layers(state_dict: Mapping, prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"Expected consecutive '{prefix}.N.' layers, found indices {sorted(indices)}.")
    return len(indices)


def _heads_for_width(width: int, what: str, flag: str) -> int:
    if width not in OFFICIAL_HEADS_BY_WIDTH:
        raise ValueError(
            f"The {what} width {width} is not one of the official sizes {sorted(OFFICIAL_HEADS_BY_WIDTH)}; pass "
            f"{flag} to say how many attention heads it uses."
        )
    return OFFICIAL_HEADS_BY_WIDTH[width]


def infer_config(
    sections: Mapping[str, Mapping[str, torch.Tensor]],
    num_attention_heads: int | None = None,
    pred_num_attention_heads: int | None = None,
    **overrides,
) -> IJepaConfig:
    """Architecture from the official tensors: patch size and channels from `patch_embed.proj.weight`
    `(D, C, p, p)`, width D, depth from the block count, MLP width from `fc1`, image size from the position-table
    length N (a square grid of sqrt(N) patches), predictor width/depth/MLP the same way. Heads: the official
    width -> heads table (`OFFICIAL_HEADS_BY_WIDTH`) unless given; the predictor uses the encoder's head count,
    as the official `init_model` does. `overrides` are passed to `IJepaConfig` (e.g. masking fields)."""
    encoder, predictor = sections["encoder"], sections["predictor"]
    hidden, channels, patch_h, patch_w = encoder["patch_embed.proj.weight"].shape
    if patch_h != patch_w:
        raise ValueError(f"Non-square patches {patch_h}x{patch_w} are not produced by the official code.")
    num_patches = encoder["pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} positions, not a square grid; cannot infer the image size.")
    heads = num_attention_heads or _heads_for_width(hidden, "encoder", "--num_attention_heads")
    pred_hidden = predictor["predictor_embed.weight"].shape[0]
    pred_intermediate = predictor["predictor_blocks.0.mlp.fc1.weight"].shape[0]
    for section in ("encoder", "target_encoder"):
        if not sections[section]["blocks.0.attn.qkv.weight"].shape[0] == 3 * hidden:
            raise ValueError(f"{section}: qkv projection does not match width {hidden}.")
    target_shapes = {k: tuple(v.shape) for k, v in sections["target_encoder"].items()}
    encoder_shapes = {k: tuple(v.shape) for k, v in encoder.items()}
    if target_shapes != encoder_shapes:
        differing = sorted(k for k in set(target_shapes) | set(encoder_shapes) if target_shapes.get(k) != encoder_shapes.get(k))
        raise ValueError(
            f"target_encoder and encoder differ in architecture (keys/shapes {differing[:10]}); the official code "
            "makes the target encoder a copy of the encoder."
        )
    fields = dict(
        hidden_size=int(hidden),
        num_hidden_layers=_count_layers(encoder, "blocks"),
        num_attention_heads=int(heads),
        intermediate_size=int(encoder["blocks.0.mlp.fc1.weight"].shape[0]),
        layer_norm_eps=OFFICIAL_LAYER_NORM_EPS,
        image_size=int(grid * patch_h),
        patch_size=int(patch_h),
        num_channels=int(channels),
        qkv_bias="blocks.0.attn.qkv.bias" in encoder,
        pred_hidden_size=int(pred_hidden),
        pred_num_hidden_layers=_count_layers(predictor, "predictor_blocks"),
        pred_num_attention_heads=int(pred_num_attention_heads or heads),
        pred_mlp_ratio=pred_intermediate / pred_hidden,
    )
    if ("predictor_blocks.0.attn.qkv.bias" in predictor) != fields["qkv_bias"]:
        raise ValueError("Encoder and predictor disagree on qkv biases; IJepaConfig has one qkv_bias for both.")
    fields.update(overrides)
    return IJepaConfig(**fields)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict` that names every missing and unexpected key in one error."""
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"Loading {what} is not exact.\n  missing keys (model has, file lacks): {result.missing_keys}\n"
            f"  unexpected keys (file has, model lacks): {result.unexpected_keys}"
        )


def official_to_model(
    checkpoint: Mapping,
    num_attention_heads: int | None = None,
    pred_num_attention_heads: int | None = None,
    **config_overrides,
) -> tuple[IJepaForPreTraining, bool]:
    """Build an `IJepaForPreTraining` from an official checkpoint dict with a strict load. Returns the model (eval
    mode) and whether the file's keys carried the DDP prefix."""
    sections, had_prefix = official_sections(checkpoint)
    state_dict = {}  # renamed first, so that unknown keys are reported before any shape reasoning
    for section, prefix in SECTION_PREFIXES.items():
        for key, tensor in official_to_ours(sections[section], KEY_MAPS[section], section).items():
            state_dict[prefix + key] = tensor
    config = infer_config(sections, num_attention_heads, pred_num_attention_heads, **config_overrides)
    model = IJepaForPreTraining(config)
    load_strict(model, state_dict, "the official checkpoint into IJepaForPreTraining")
    return model.eval(), had_prefix


def model_to_official(
    model: IJepaForPreTraining, ddp_prefix: bool = True, epoch: int = 0, **extra
) -> dict:
    """An official-format checkpoint dict from our model. `opt` and `scaler` are `None`: no optimizer state travels
    with our checkpoints (the official `load_checkpoint` loads the three state dicts first, then fails on
    `opt.load_state_dict(None)` inside its `try`, logs it and restarts at epoch 0 with the loaded weights)."""
    ours = model.state_dict()
    checkpoint: dict = {}
    for section, prefix in SECTION_PREFIXES.items():
        section_dict = {key[len(prefix):]: value for key, value in ours.items() if key.startswith(prefix)}
        official = ours_to_official(section_dict, KEY_MAPS[section], section)
        if ddp_prefix:
            official = {DDP_PREFIX + key: value for key, value in official.items()}
        checkpoint[section] = {key: value.detach().clone().contiguous() for key, value in official.items()}
    unplaced = [k for k in ours if not any(k.startswith(p) for p in SECTION_PREFIXES.values())]
    if unplaced:
        raise ValueError(f"Weights outside encoder/predictor/target encoder cannot go to the official format: {unplaced}")
    checkpoint.update(opt=None, scaler=None, epoch=epoch, **extra)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Reference forward passes on official-format tensors (the math of the official `VisionTransformer` and
# `VisionTransformerPredictor`), used to check that converted models compute the same function.


def _reference_block(x: torch.Tensor, sd: Mapping, prefix: str, num_heads: int, eps: float) -> torch.Tensor:
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    h = F.layer_norm(x, (width,), sd[f"{prefix}norm1.weight"], sd[f"{prefix}norm1.bias"], eps)
    qkv = F.linear(h, sd[f"{prefix}attn.qkv.weight"], sd.get(f"{prefix}attn.qkv.bias"))  # (B, T, 3W)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
    weights = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + F.linear(attended, sd[f"{prefix}attn.proj.weight"], sd[f"{prefix}attn.proj.bias"])
    h = F.layer_norm(x, (width,), sd[f"{prefix}norm2.weight"], sd[f"{prefix}norm2.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, sd[f"{prefix}mlp.fc1.weight"], sd[f"{prefix}mlp.fc1.bias"])),
                 sd[f"{prefix}mlp.fc2.weight"], sd[f"{prefix}mlp.fc2.bias"])
    return x + h


def _reference_gather(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.stack([x[b, m[b]] for b in range(x.size(0))]) for m in masks], dim=0)


@torch.no_grad()
def reference_encoder_forward(
    sd: Mapping, pixel_values: torch.Tensor, num_heads: int, masks: list[torch.Tensor] | None = None,
    eps: float = OFFICIAL_LAYER_NORM_EPS,
) -> torch.Tensor:
    """Official `VisionTransformer.forward` on official tensors (no `module.`): `(M * B, kept, D)` or `(B, N, D)`."""
    weight = sd["patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, N, D)
    if masks is not None:
        x = _reference_gather(x, masks)
    for index in range(_count_layers(sd, "blocks")):
        x = _reference_block(x, sd, f"blocks.{index}.", num_heads, eps)
    return F.layer_norm(x, (x.size(-1),), sd["norm.weight"], sd["norm.bias"], eps)


@torch.no_grad()
def reference_predictor_forward(
    sd: Mapping, context: torch.Tensor, context_masks: list[torch.Tensor], target_masks: list[torch.Tensor],
    num_heads: int, eps: float = OFFICIAL_LAYER_NORM_EPS,
) -> torch.Tensor:
    """Official `VisionTransformerPredictor.forward`: context `(C * B, Kc, D)` -> predictions `(T * C * B, Kt, D)`."""
    batch = context.size(0) // len(context_masks)
    positions = sd["predictor_pos_embed"].expand(batch, -1, -1)
    x = F.linear(context, sd["predictor_embed.weight"], sd["predictor_embed.bias"])
    x = x + _reference_gather(positions, context_masks)
    num_context_tokens = x.size(1)
    target_pos = _reference_gather(positions, target_masks)  # (T * B, Kt, P), target-block major
    # Each target block's rows repeated once per context block: (T * C * B, Kt, P).
    target_pos = torch.cat(
        [target_pos[t * batch:(t + 1) * batch] for t in range(len(target_masks)) for _ in context_masks], dim=0
    )
    tokens = sd["mask_token"] + target_pos
    x = torch.cat([x.repeat(len(target_masks), 1, 1), tokens], dim=1)
    for index in range(_count_layers(sd, "predictor_blocks")):
        x = _reference_block(x, sd, f"predictor_blocks.{index}.", num_heads, eps)
    x = F.layer_norm(x, (x.size(-1),), sd["predictor_norm.weight"], sd["predictor_norm.bias"], eps)
    return F.linear(x[:, num_context_tokens:], sd["predictor_proj.weight"], sd["predictor_proj.bias"])


# ---------------------------------------------------------------------------------------------------------------------
# Verification: fixed inputs, three outputs (context encoder, predictor, target encoder), max abs differences.


def verification_inputs(config: IJepaConfig, batch_size: int = 2, seed: int = 0):
    """Deterministic images `(B, C, H, W)` and multi-block masks (the config's sampler) for comparing two models."""
    generator = torch.Generator().manual_seed(seed)
    height, width = config.image_size_hw
    pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator)
    # min_keep capped so that tiny test grids (8x8) can hold target blocks; the paper's 16x16+ grids keep theirs.
    settings = MaskSamplingSettings.from_config(config, min_keep=min(config.min_keep, config.num_patches // 16))
    context_mask, target_mask, _ = sample_masks(settings, batch_size, generator)
    return pixel_values, context_mask, target_mask


@torch.no_grad()
def model_outputs(model: IJepaForPreTraining, pixel_values, context_mask, target_mask) -> dict[str, torch.Tensor]:
    model.eval()
    context = model.context_encoder(pixel_values, context_mask=context_mask).last_hidden_state
    return {
        "encoder": context,
        "predictor": model.predictor(context, context_mask, target_mask),
        "target_encoder": model.ijepa(pixel_values).last_hidden_state,
    }


def official_outputs(checkpoint: Mapping, config: IJepaConfig, pixel_values, context_mask, target_mask) -> dict:
    sections, _ = official_sections(checkpoint)
    heads, pred_heads = config.num_attention_heads, config.pred_num_attention_heads
    context = reference_encoder_forward(sections["encoder"], pixel_values, heads, context_mask)
    return {
        "encoder": context,
        "predictor": reference_predictor_forward(sections["predictor"], context, context_mask, target_mask, pred_heads),
        "target_encoder": reference_encoder_forward(sections["target_encoder"], pixel_values, heads),
    }


def max_abs_diffs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((a[name].float() - b[name].float()).abs().max()) for name in a}


def check_diffs(diffs: Mapping[str, float], atol: float, what: str) -> None:
    bad = {name: value for name, value in diffs.items() if not value <= atol}
    if bad:
        raise AssertionError(f"Verification failed for {what}: max abs differences {bad} exceed {atol}.")


def assert_state_dicts_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str) -> None:
    if set(a) != set(b):
        raise AssertionError(f"{what}: key sets differ: only in first {sorted(set(a) - set(b))[:10]}, only in second "
                             f"{sorted(set(b) - set(a))[:10]}")
    different = [key for key in a if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key])]
    if different:
        raise AssertionError(f"{what}: tensors differ for {different[:10]} ({len(different)} in all).")


# ---------------------------------------------------------------------------------------------------------------------
# Plain-transformers encoder export.


def plain_encoder_config(config: IJepaConfig) -> transformers.IJepaConfig:
    """transformers' own `IJepaConfig` with the encoder fields only (no predictor/masking fields, no auto_map)."""
    return transformers.IJepaConfig(**{name: getattr(config, name) for name in ENCODER_FIELDS})


def export_encoder(model: IJepaForPreTraining, which: str = "target") -> transformers.IJepaModel:
    """One encoder of `model` as transformers' built-in `IJepaModel` (strict load; same parameter names).
    `which="target"`: the EMA target encoder, which the paper evaluates; `"context"`: the context encoder (what
    transformers' `facebook/ijepa_vith14_1k` and timm's I-JEPA weights hold)."""
    sources = {"target": model.ijepa, "context": model.context_encoder}
    if which not in sources:
        raise ValueError(f"which={which!r}: choose 'target' (EMA encoder, evaluated in the paper) or 'context'.")
    encoder = transformers.IJepaModel(plain_encoder_config(model.config))
    load_strict(encoder, sources[which].state_dict(), f"the {which} encoder into transformers.IJepaModel")
    return encoder.eval()


def eval_image_processor(config) -> BitImageProcessor:
    """Evaluation preprocessing for `config.image_size`: resize short side to size / 0.875, center crop, ImageNet
    mean/std (e.g. 256 -> 224 for ViT-H/14, 512 -> 448 for ViT-H/16-448)."""
    height, width = (config.image_size, config.image_size) if isinstance(config.image_size, int) else config.image_size
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(round(min(height, width) / EVAL_CROP_FRACTION))},
        resample=EVAL_RESAMPLE_BICUBIC,
        do_center_crop=True,
        crop_size={"height": int(height), "width": int(width)},
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


__all__ = [
    "DDP_PREFIX",
    "ENCODER_KEY_MAP",
    "PREDICTOR_KEY_MAP",
    "KEY_MAPS",
    "KeyRule",
    "OFFICIAL_HEADS_BY_WIDTH",
    "SECTION_PREFIXES",
    "assert_state_dicts_equal",
    "check_diffs",
    "eval_image_processor",
    "export_encoder",
    "infer_config",
    "load_official_checkpoint",
    "load_strict",
    "max_abs_diffs",
    "model_outputs",
    "model_to_official",
    "official_outputs",
    "official_sections",
    "official_to_model",
    "official_to_ours",
    "ours_to_official",
    "plain_encoder_config",
    "reference_encoder_forward",
    "reference_predictor_forward",
    "strip_ddp_prefix",
    "verification_inputs",
]
