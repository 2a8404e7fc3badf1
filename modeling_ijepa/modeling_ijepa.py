"""I-JEPA models: encoder, predictor, pretraining model (context encoder + predictor + EMA target encoder), classifier.

Reference: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture",
CVPR 2023, and the official implementation facebookresearch/ijepa (`src/models/vision_transformer.py`,
`src/train.py`, `src/masks/utils.py`). Docstrings name the official counterpart of each piece.

The encoder reuses transformers' own I-JEPA modules (`IJepaEmbeddings`, `IJepaLayer`), so parameter names are those
of `transformers.IJepaModel` and weights move both ways without renaming. The predictor builds the same `IJepaLayer`
at its own width.

This file imports only torch and transformers (plus its sibling files) so the Hub can load it as custom code. The
key renames that let Hub-format (transformers 4.x layout) checkpoints load are registered *here*, not in the package
`__init__`, so that remote-code loads get them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.ijepa.modeling_ijepa import IJepaEmbeddings, IJepaLayer, eager_attention_forward
from transformers.models.ijepa.modeling_ijepa import IJepaPreTrainedModel as TransformersIJepaPreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_ijepa import IJepaConfig
from .masking_ijepa import MaskSamplingSettings, sample_masks

# Official `forward_target`: `F.layer_norm(h, (h.size(-1),))` with PyTorch's default eps, not the model's 1e-6.
TARGET_LAYER_NORM_EPS = 1e-5

# Official `src/train.py`: `ema: [0.996, 1.0]` in every released config.
EMA_MOMENTUM_START = 0.996
EMA_MOMENTUM_END = 1.0

# ---------------------------------------------------------------------------------------------------------------------
# Weight-name migration. transformers 4.x (and the Hub's facebook/ijepa_* repos) store the encoder as
# `encoder.layer.N.attention.attention.query...`; transformers 5.x names it `layers.N.attention.q_proj...`. Built-in
# classes get these renames from transformers' conversion mapping; classes defined outside transformers only when
# registered by class name. Registering here (the modeling file) makes remote-code loads behave the same.
_ENCODER_KEY_RENAMES = get_checkpoint_conversion_mapping("ViTModel")
if _ENCODER_KEY_RENAMES is None:
    raise ImportError(
        "This transformers version has no 'ViTModel' checkpoint conversion mapping; install transformers 5.x "
        "(pip install 'transformers>=5,<6')."
    )
for _class_name in ("IJepaModel",):
    register_checkpoint_conversion_mapping(_class_name, get_checkpoint_conversion_mapping("ViTModel"), overwrite=True)


# ---------------------------------------------------------------------------------------------------------------------
# Small utilities shared by encoder, predictor and loss.


def sincos_position_embeddings(embed_dim: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings `(grid_height * grid_width, embed_dim)` in raster order.

    Official `get_2d_sincos_pos_embed` (MAE-style): half the channels encode the column (x) coordinate, half the row
    (y); each half is `[sin(pos * omega), cos(pos * omega)]` with `omega_k = 1 / 10000^(k / (D/4))`.
    Computed in float64, like the official numpy code, then cast to float32.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {embed_dim}.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_height, dtype=torch.float64), torch.arange(grid_width, dtype=torch.float64), indexing="ij"
    )

    def encode(positions):  # (N,) -> (N, D/2)
        angles = positions.reshape(-1, 1) * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    # Official order: the first half comes from grid[0], which is the column index (np.meshgrid(w, h)).
    return torch.cat([encode(cols), encode(rows)], dim=1).to(torch.float32)


def resample_position_embeddings(
    position_embeddings: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """A position table for another patch grid, resampled the way the encoder resamples its own under
    `interpolate_pos_encoding=True` (transformers' `IJepaEmbeddings.interpolate_pos_encoding`, as in DINO/DINOv2:
    bicubic, `align_corners=False`), so that the predictor's positions mean what the context features' positions mean.

    Args:
        position_embeddings: `(1, grid_height * grid_width, dim)`, raster order.
        grid / new_grid: `(height, width)` in patches.
    Returns:
        `(1, new_height * new_width, dim)`; `position_embeddings` itself when the grids are equal.
    """
    if tuple(new_grid) == tuple(grid):
        return position_embeddings
    dim = position_embeddings.size(-1)
    table = position_embeddings.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    table = F.interpolate(table, size=tuple(new_grid), mode="bicubic", align_corners=False)  # (1, D, h', w')
    return table.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


def as_mask_list(masks: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None):
    """Normalise a mask argument to a list of `(batch, kept)` LongTensors (one tensor is accepted)."""
    if masks is None:
        return None
    if isinstance(masks, torch.Tensor):
        return [masks]
    return list(masks)


def gather_patches(hidden_states: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Keep the patches listed in each mask (official `apply_masks`).

    Args:
        hidden_states: `(batch, num_patches, dim)`.
        masks: list of M LongTensors `(batch, kept)`.
    Returns:
        `(M * batch, kept, dim)`, mask-major: rows `[m * batch:(m + 1) * batch]` belong to mask m.
    """
    gathered = [
        hidden_states.gather(1, mask.unsqueeze(-1).expand(-1, -1, hidden_states.size(-1))) for mask in masks
    ]
    return torch.cat(gathered, dim=0)


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """Repeat each consecutive chunk of `batch_size` rows `repeat` times (official `repeat_interleave_batch`).

    `(N * batch, ...)` -> `(N * repeat * batch, ...)`, chunk order `[c0, c0, ..., c1, c1, ...]`.
    """
    num_chunks = x.size(0) // batch_size
    return x.reshape(num_chunks, 1, batch_size, *x.shape[1:]).expand(-1, repeat, -1, *x.shape[1:]).reshape(
        num_chunks * repeat * batch_size, *x.shape[1:]
    )


def ema_momentum(step: int, total_steps: int, start: float = EMA_MOMENTUM_START, end: float = EMA_MOMENTUM_END) -> float:
    """EMA momentum used for the target update after optimizer step `step` (0-based); paper Sec. 4, official
    `momentum_scheduler`: linear from `start` at step 0 to `end` at `total_steps`
    (`total_steps = ipe_scale * epochs * iterations_per_epoch` in the official code)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    return start + step * (end - start) / total_steps


def prediction_loss(predicted: torch.Tensor, targets: torch.Tensor, loss_type: str = "smooth_l1") -> torch.Tensor:
    """Official `loss_fn`: `F.smooth_l1_loss(z, h)` (or MSE), the mean over every element, computed in fp32.

    Under mixed precision the predictor's output is bf16/fp16 while the layer-normed targets are fp32; the official
    step compares against the fp32 targets, so the predictions are upcast rather than the targets rounded down.
    In fp32 both casts are no-ops (the same tensors, bit for bit).

    Args:
        predicted: `(T * C * B, Kt, D)`, any float dtype.
        targets: `(T * C * B, Kt, D)`, fp32.
    Returns:
        fp32 scalar.
    """
    predicted, targets = predicted.float(), targets.float()
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(predicted, targets)
    return F.mse_loss(predicted, targets)


# SIGReg's quadrature: the Epps-Pulley integral over t in [-SIGREG_T_MAX, SIGREG_T_MAX] (the integrand is even, so
# twice the trapezoid rule on [0, SIGREG_T_MAX] with SIGREG_NUM_POINTS knots), weighted by the Gaussian window
# exp(-t^2 / 2), which leaves almost nothing beyond |t| = 3 (LeJEPA's choice of grid).
SIGREG_T_MAX = 3.0
SIGREG_NUM_POINTS = 17


def sigreg_directions(dim: int, num_slices: int, generator: torch.Generator) -> torch.Tensor:
    """`(dim, num_slices)` random unit directions (Gaussian columns normalised), drawn on the CPU from `generator`
    (so every process that seeds it the same draws the same directions)."""
    directions = torch.randn(dim, num_slices, generator=generator)
    return directions / directions.norm(dim=0, keepdim=True)


def sigreg_statistic(embeddings: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun 2025): how far `embeddings` `(N, D)` are from a standard isotropic
    Gaussian, seen through the 1-D projections on `directions` `(D, S)`. For each projection x_1..x_N, the
    Epps-Pulley discrepancy between its empirical characteristic function and the Gaussian's:

        integral over t of |(1/N) sum_j exp(i t x_j) - exp(-t^2/2)|^2 exp(-t^2/2) dt

    on a fixed trapezoid grid (`SIGREG_T_MAX`, `SIGREG_NUM_POINTS`), averaged over the S directions. This is the
    Epps-Pulley test statistic divided by N (so the value, and a weight on it, do not depend on the batch size):
    about sqrt(2 pi) (1 - 1/sqrt(3)) / N = 1.06 / N for Gaussian samples, of order 0.1-1 for collapsed or anisotropic
    ones. fp32 scalar, differentiable.
    """
    t = torch.linspace(0.0, SIGREG_T_MAX, SIGREG_NUM_POINTS, device=embeddings.device)  # (P,)
    step = SIGREG_T_MAX / (SIGREG_NUM_POINTS - 1)
    trapezoid = torch.full_like(t, step)
    trapezoid[[0, -1]] = step / 2
    gaussian_cf = torch.exp(-0.5 * t**2)  # (P,)
    weights = 2.0 * trapezoid * gaussian_cf  # symmetric integral x Gaussian window
    projections = embeddings.float() @ directions.to(embeddings.device, torch.float32)  # (N, S)
    angles = projections.unsqueeze(-1) * t  # (N, S, P)
    real_error = torch.cos(angles).mean(dim=0) - gaussian_cf  # (S, P)
    imaginary = torch.sin(angles).mean(dim=0)  # (S, P)
    return ((real_error**2 + imaginary**2) @ weights).mean()


def layer_outputs_for_trailing_tokens(layer: IJepaLayer, hidden_states: torch.Tensor, first_output: int, **kwargs):
    """`layer(hidden_states)[:, first_output:]`, computed without the outputs that would be thrown away.

    Every token still serves as a key and value, but only tokens `first_output:` are queries, go through the
    attention output projection and the MLP. The predictor's last layer uses it: the official predictor discards the
    context tokens' outputs, which are most of the sequence. The same `IJepaLayer` modules do the math.

    Args:
        layer: an `IJepaLayer`.
        hidden_states: `(batch, seq, dim)`.
        first_output: index of the first token whose output is needed.
    Returns:
        `(batch, seq - first_output, dim)`.
    """
    attention = layer.attention
    normed = layer.layernorm_before(hidden_states)
    query_input = normed[:, first_output:]

    def heads(projection, x):  # (batch, tokens, dim) -> (batch, heads, tokens, head_dim)
        return projection(x).view(*x.shape[:-1], -1, attention.head_dim).transpose(1, 2)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    attended, _ = attention_interface(
        attention,
        heads(attention.q_proj, query_input),
        heads(attention.k_proj, normed),
        heads(attention.v_proj, normed),
        None,
        dropout=0.0 if not attention.training else attention.attention_dropout,
        scaling=attention.scaling,
        **kwargs,
    )
    attended = attention.o_proj(attended.reshape(*query_input.shape[:-1], -1).contiguous())
    hidden = layer.dropout(attended) + hidden_states[:, first_output:]
    return layer.dropout(layer.mlp(layer.layernorm_after(hidden))) + hidden


def tag_residual_projections(layers: nn.ModuleList) -> None:
    """Mark each layer's residual-branch output projections with their 1-based depth, for the optional official
    depth rescale at init (`config.rescale_init_by_depth`). Tags live on the Linear modules because transformers
    skips init hooks of parameter-less modules in custom code."""
    for number, layer in enumerate(layers, start=1):
        layer.attention.o_proj.residual_layer_number = number
        layer.mlp.fc2.residual_layer_number = number


def validate_masks(
    masks: list[torch.Tensor],
    batch_size: int,
    num_patches: int,
    name: str,
    expected_blocks: int | None = None,
    check_values: bool = True,
) -> None:
    """Raise a clear error for malformed masks (wrong batch, empty, out of range, wrong count).

    Shape and dtype checks are free; the index-range check reads values back (`int(mask.min())`), which is a
    device sync on GPU and a graph break under `torch.compile`: `check_values=False` skips it.
    """
    if len(masks) == 0:
        raise ValueError(f"{name} is an empty list; pass one LongTensor (batch, kept_patches) per block.")
    if expected_blocks is not None and len(masks) != expected_blocks:
        raise ValueError(
            f"{name} has {len(masks)} blocks but the config says {expected_blocks}; pass that many masks or change "
            "the config's num_context_blocks/num_target_blocks."
        )
    for index, mask in enumerate(masks):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}[{index}] must be a 2-D LongTensor (batch, kept_patches), got {shape}.")
        if mask.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}[{index}] must hold integer patch indices, got dtype {mask.dtype}.")
        if mask.size(0) != batch_size:
            raise ValueError(
                f"{name}[{index}] is for a batch of {mask.size(0)} but pixel_values has {batch_size} images; "
                "sample masks for the same batch."
            )
        if mask.size(1) == 0:
            raise ValueError(f"{name}[{index}] keeps no patch; every block must keep at least one patch.")
        if not check_values:
            continue
        low, high = int(mask.min()), int(mask.max())
        if low < 0 or high >= num_patches:
            raise ValueError(
                f"{name}[{index}] holds patch indices in [{low}, {high}] but the grid has {num_patches} patches "
                f"(valid indices 0..{num_patches - 1})."
            )


def value_checks_enabled(module: nn.Module) -> bool:
    """Whether forward should run the mask checks that read tensor values (see `validate_masks`): on unless the
    module's `check_mask_values` is False (fast training loops) or `torch.compile` is tracing (they would break the
    graph)."""
    return getattr(module, "check_mask_values", True) and not torch.compiler.is_compiling()


def check_no_overlap(context_mask: list[torch.Tensor], target_mask: list[torch.Tensor], num_patches: int) -> None:
    """Raise if any context block shares a patch with a target block of the same image."""
    batch = context_mask[0].size(0)
    context_hit = torch.zeros(batch, num_patches, dtype=torch.bool, device=context_mask[0].device)
    for mask in context_mask:
        context_hit.scatter_(1, mask, True)
    for index, mask in enumerate(target_mask):
        overlap = context_hit.gather(1, mask)
        if overlap.any():
            sample = int(overlap.any(dim=1).nonzero()[0])
            raise ValueError(
                f"target_mask[{index}] overlaps the context for sample {sample} while config.allow_overlap is False. "
                "Remove the target patches from the context, or set allow_overlap=True (in the config, or as a forward "
                "argument for one call)."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class IJepaForPreTrainingOutput(ModelOutput):
    """Output of `IJepaForPreTraining.forward`.

    With B images, C context blocks, T target blocks, Kc context patches, Kt target patches, D = hidden_size:

    Args:
        loss (`torch.FloatTensor` of shape `()`): smooth-L1 (or MSE) between predictions and targets, averaged over
            every element (official `F.smooth_l1_loss(z, h)`).
        predicted_hidden_states (`(T * C * B, Kt, D)`): predictor outputs at the target positions, official order
            (target-block major, then context block, then image).
        target_hidden_states (`(T * C * B, Kt, D)`): layer-normed target-encoder features at the same positions.
        context_hidden_states (`(C * B, Kc, D)`): context-encoder outputs.
        context_mask / target_mask: the masks used (sampled by the model when none were given).
        hidden_states / attentions: of the context encoder, when requested.
        sigreg (`()`): with `config.sigreg_weight > 0`, the SIGReg statistic of the context embeddings (unweighted;
            `loss` already holds `sigreg_weight * sigreg`).
    """

    loss: torch.FloatTensor | None = None
    predicted_hidden_states: torch.FloatTensor | None = None
    target_hidden_states: torch.FloatTensor | None = None
    context_hidden_states: torch.FloatTensor | None = None
    context_mask: list[torch.LongTensor] | None = None
    target_mask: list[torch.LongTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    sigreg: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Models


class IJepaPreTrainedModel(TransformersIJepaPreTrainedModel):
    """Base class: this package's config, the official initialisation and fixed sin-cos position tables."""

    config_class = IJepaConfig
    config: IJepaConfig
    base_model_prefix = "ijepa"
    _no_split_modules = ["IJepaEmbeddings", "IJepaLayer"]
    # Mask checks that read tensor values (index range, context/target overlap) run in eager forward unless this is
    # set to False on the instance: each is a GPU->CPU sync, worth skipping in a training loop fed by
    # `IJepaMaskCollator`. They are always skipped under `torch.compile` (see `value_checks_enabled`).
    check_mask_values: bool = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # Loading replaces parameters and forgets `requires_grad=False`: re-freeze what is never trained.
        model.freeze_fixed_parameters()
        return loaded

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' `set_attn_implementation`, followed by the predictors: their layers read a config of their
        own (`IJepaPredictor.layer_config`, built at the predictor's width) which transformers does not know about.
        Setting it here, not in `forward`, keeps attribute assignments out of compiled regions."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, IJepaPredictor):
                module.layer_config._attn_implementation = module.config._attn_implementation

    if not hasattr(TransformersIJepaPreTrainedModel, "activation_checkpointing_enable"):
        # Older transformers 5.x (5.17 among them) has only the older name: same layers, non-reentrant checkpoints.

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
            checkpoint_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def freeze_fixed_parameters(self) -> None:
        """Fixed sin-cos tables (paper Sec. 4, official `requires_grad=False`) and, in pretraining models, the EMA
        target encoder are never trained."""
        for module in self.modules():
            if isinstance(module, (IJepaEmbeddings, IJepaPredictor)):
                module.position_embeddings.requires_grad_(False)

    def _init_weights(self, module):
        """As the released runs started (official `init_model`): truncated normal (std `initializer_range`) for
        every linear and conv weight, zero biases, LayerNorm 1/0, fixed sin-cos position tables, truncated-normal
        mask token. Optional depth rescale (`config.rescale_init_by_depth`, off by default, see config)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            depth = getattr(module, "residual_layer_number", None)
            if depth is not None and self.config.rescale_init_by_depth:
                # Official `fix_init_weight`: layer l (1-based) divides attn.proj and mlp.fc2 by sqrt(2 l).
                init.copy_(module.weight, module.weight / (2.0 * depth) ** 0.5)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, IJepaEmbeddings):
            grid = module.patch_embeddings.image_size[0] // module.patch_embeddings.patch_size[0], (
                module.patch_embeddings.image_size[1] // module.patch_embeddings.patch_size[1]
            )
            table = sincos_position_embeddings(module.position_embeddings.size(-1), *grid)
            init.copy_(module.position_embeddings, table[None].to(module.position_embeddings.dtype))
        elif isinstance(module, IJepaPredictor):
            table = sincos_position_embeddings(module.position_embeddings.size(-1), *self.config.patch_grid)
            init.copy_(module.position_embeddings, table[None].to(module.position_embeddings.dtype))
            init.trunc_normal_(module.mask_token, mean=0.0, std=std)


class IJepaModel(IJepaPreTrainedModel):
    """The I-JEPA ViT encoder (official `VisionTransformer`): patch embedding, fixed sin-cos positions (no CLS
    token), `num_hidden_layers` pre-norm transformer layers, final LayerNorm.

    Parameter names equal `transformers.IJepaModel`'s. `pooler_output` is the mean over patch tokens, the feature
    the paper evaluates (the built-in class returns `None` there).
    """

    _keys_to_ignore_on_load_unexpected = [r"context_encoder\.", r"predictor\."]

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        self.embeddings = IJepaEmbeddings(config)
        # Paper Sec. 4 / official `pos_embed`: fixed, not trained.
        self.embeddings.position_embeddings.requires_grad_(False)
        self.layers = nn.ModuleList([IJepaLayer(config) for _ in range(config.num_hidden_layers)])
        tag_residual_projections(self.layers)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        context_mask: torch.Tensor | list[torch.Tensor] | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`(batch, num_channels, height, width)`): images.
            context_mask (list of LongTensor `(batch, kept)`, or one tensor, *optional*): patches to keep. When
                given, only these patches (gathered after the position embeddings) go through the transformer and
                the output batch is `len(context_mask) * batch`, mask-major (official order).
            interpolate_pos_encoding (`bool`, *optional*): interpolate the position table to another image size.

        Returns:
            `BaseModelOutputWithPooling` with `last_hidden_state` `(M * batch, kept or num_patches, hidden_size)` and
            `pooler_output` `(M * batch, hidden_size)` (mean over tokens).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) tensor.")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        masks = as_mask_list(context_mask)
        if masks is not None:
            check_values = value_checks_enabled(self)
            validate_masks(masks, pixel_values.size(0), hidden_states.size(1), "context_mask", check_values=check_values)
            hidden_states = gather_patches(hidden_states, masks)  # (M * B, kept, D)
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, **kwargs)
        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output.mean(dim=1))


class IJepaPredictor(nn.Module):
    """The narrow ViT predictor (official `VisionTransformerPredictor`, paper Sec. 3 "Prediction").

    Context features are projected to `pred_hidden_size` and given their fixed sin-cos positions; one learned mask
    token plus the target's position is placed at each target patch; the context is repeated per target block (as
    the official predictor does), `pred_num_hidden_layers` `IJepaLayer`s run at the predictor width, then LayerNorm
    and a projection back to `hidden_size`.

    Official names: `predictor_embed` -> `input_projection`, `predictor_pos_embed` -> `position_embeddings`,
    `predictor_blocks` -> `layers`, `predictor_norm` -> `layernorm`, `predictor_proj` -> `output_projection`.
    """

    def __init__(self, config: IJepaConfig):
        super().__init__()
        self.config = config
        self.layer_config = config.predictor_layer_config()
        width = config.pred_hidden_size
        self.input_projection = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches, width), requires_grad=False)
        self.layers = nn.ModuleList([IJepaLayer(self.layer_config) for _ in range(config.pred_num_hidden_layers)])
        tag_residual_projections(self.layers)
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.output_projection = nn.Linear(width, config.hidden_size)

    def forward(
        self,
        context_hidden_states: torch.Tensor,
        context_mask: list[torch.Tensor],
        target_mask: list[torch.Tensor],
        patch_grid: tuple[int, int] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            context_hidden_states: `(C * B, Kc, hidden_size)`, the context encoder's output.
            context_mask: list of C LongTensors `(B, Kc)`.
            target_mask: list of T LongTensors `(B, Kt)`.
            patch_grid: `(height, width)` of the image's patch grid the masks index, when it is not the config's
                (images at another size with `interpolate_pos_encoding`); the position table is then resampled to it
                (`resample_position_embeddings`).
        Returns:
            `(T * C * B, Kt, hidden_size)` predictions, official order.
        """
        num_context, num_target = len(context_mask), len(target_mask)
        batch_size = context_hidden_states.size(0) // num_context
        positions = self.position_embeddings
        if patch_grid is not None:
            positions = resample_position_embeddings(positions, self.config.patch_grid, patch_grid)
        positions = positions.expand(batch_size, -1, -1)  # (B, N, P)

        hidden = self.input_projection(context_hidden_states)  # (C*B, Kc, P)
        hidden = hidden + gather_patches(positions, context_mask)
        num_context_tokens = hidden.size(1)

        target_positions = gather_patches(positions, target_mask)  # (T*B, Kt, P)
        target_positions = repeat_interleave_batch(target_positions, batch_size, repeat=num_context)  # (T*C*B, Kt, P)
        target_tokens = self.mask_token.to(target_positions.dtype) + target_positions

        hidden = hidden.repeat(num_target, 1, 1)  # (T*C*B, Kc, P)
        hidden = torch.cat([hidden, target_tokens], dim=1)  # (T*C*B, Kc+Kt, P)
        for layer in self.layers[:-1]:
            hidden = layer(hidden, None, **kwargs)
        # Only the target tokens' outputs are used: the last layer skips the context tokens' queries and MLP.
        last = self.layers[-1]
        last_layer_forward = partial(layer_outputs_for_trailing_tokens, last, first_output=num_context_tokens, **kwargs)
        if last.gradient_checkpointing and last.training and torch.is_grad_enabled():
            hidden = last._gradient_checkpointing_func(last_layer_forward, hidden)  # as IJepaLayer checkpoints itself
        else:
            hidden = last_layer_forward(hidden)
        return self.output_projection(self.layernorm(hidden))  # (T*C*B, Kt, D)


class IJepaForPreTraining(IJepaPreTrainedModel):
    """I-JEPA pretraining: context encoder, predictor and EMA target encoder (paper Fig. 3, official `train.py`).

    * `self.ijepa` (alias `self.target_encoder`) is the EMA target encoder, under the base-model prefix so that
      `AutoModel`/`IJepaModel.from_pretrained(pretraining_dir)` load it: it is the encoder the paper evaluates.
      Frozen, always in eval mode, updated only by `update_target_encoder`.
    * `self.context_encoder` and `self.predictor` are trained by the optimizer.
    """

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        self.context_encoder = IJepaModel(config)
        self.context_encoder.check_mask_values = False  # forward checks the masks once, before calling it
        self.predictor = IJepaPredictor(config)
        self.ijepa = IJepaModel(config)
        self.ijepa.requires_grad_(False)
        self.post_init()
        # Official `target_encoder = copy.deepcopy(encoder)`: start as an exact copy of the context encoder.
        # (Done here rather than in `_init_weights`: the root module has no parameters of its own, so transformers
        # skips its init hook for custom code. Under `from_pretrained` the loaded weights overwrite this copy.)
        if self.context_encoder.layernorm.weight.device.type != "meta":
            with torch.no_grad():
                for target, context in zip(self.ijepa.parameters(), self.context_encoder.parameters()):
                    target.copy_(context)
        self.ijepa.eval()

    def freeze_fixed_parameters(self) -> None:
        super().freeze_fixed_parameters()
        self.ijepa.requires_grad_(False)
        self.ijepa.eval()

    @property
    def target_encoder(self) -> IJepaModel:
        return self.ijepa

    def train(self, mode: bool = True):
        super().train(mode)
        self.ijepa.eval()  # dropout/drop-path never apply to targets
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A pretraining checkpoint also serves AutoModel (target encoder) and AutoModelForImageClassification (target
        # encoder + new head): name this file's classes for them in the auto_map too, so that remote-code loads get
        # the mean-pooled `IJepaModel` rather than transformers' built-in class.
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class, model_class in (
                ("AutoModel", IJepaModel),
                ("AutoModelForImageClassification", IJepaForImageClassification),
            ):
                auto_map.setdefault(auto_class, f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def trainable_parameters(self):
        """The parameters the optimizer should see (context encoder and predictor, minus fixed position tables)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _ema_parameter_slots(self) -> tuple[list, list]:
        """Where the target and context encoders keep their parameters, as `(module._parameters, name)` pairs in
        `parameters()` order, found once: walking the module tree every step costs ~3 ms of host time at ViT-H/14.
        Looking each parameter up in its owner's dict at every update still follows any replacement of a parameter
        (`load_state_dict(assign=True)`, `to_empty`, `.to()` that swaps tensors); replacing whole submodules after
        the first update is not supported (no training path does)."""
        slots = self.__dict__.get("_ema_slots")
        if slots is None:

            def parameter_slots(module: nn.Module) -> list:
                seen, found = set(), []
                for owner in module.modules():
                    for name, parameter in owner._parameters.items():
                        if parameter is not None and id(parameter) not in seen:
                            seen.add(id(parameter))
                            found.append((owner._parameters, name))
                return found

            slots = (parameter_slots(self.ijepa), parameter_slots(self.context_encoder))
            self.__dict__["_ema_slots"] = slots
        return slots

    @torch.no_grad()
    def update_target_encoder(self, momentum: float) -> None:
        """EMA update `target <- m * target + (1 - m) * context` (official `train.py`, after each optimizer step),
        fused with `torch._foreach_*`. Call it on the unwrapped model (`accelerator.unwrap_model(model)`)."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}.")
        target_slots, context_slots = self._ema_parameter_slots()
        target_params = [owner[name] for owner, name in target_slots]
        context_params = [owner[name] for owner, name in context_slots]  # no_grad: no detach needed
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, context_params, alpha=1.0 - momentum)

    def sample_masks(
        self, batch_size: int, generator: torch.Generator | None = None, patch_grid: tuple[int, int] | None = None
    ):
        """Multi-block masks from the config's sampler, on the model's device, drawn on `patch_grid` (`(height,
        width)` in patches; default the config's). Without a generator, one is seeded from torch's global RNG (so
        `torch.manual_seed` makes `model(pixel_values)` reproducible)."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        grid_height, grid_width = self.config.patch_grid if patch_grid is None else patch_grid
        settings = MaskSamplingSettings.from_config(self.config, grid_height=grid_height, grid_width=grid_width)
        context_mask, target_mask, _ = sample_masks(settings, batch_size, generator)
        device = self.context_encoder.embeddings.patch_embeddings.projection.weight.device
        return [m.to(device) for m in context_mask], [m.to(device) for m in target_mask]

    @torch.no_grad()
    def compute_targets(
        self, pixel_values: torch.Tensor, target_mask: list[torch.Tensor], num_context_blocks: int, **kwargs
    ) -> torch.Tensor:
        """Official `forward_target`: target encoder on the full image, layer norm over features (no affine),
        gathered at the target blocks and repeated per context block. Returns `(T * C * M * B, Kt, D)` with M =
        `config.num_mask_sets` (1: the official `(T * C * B, Kt, D)`): the encoder runs once per image, and with
        M > 1 its features serve every mask set (`target_mask` then has `M * B` rows, set-major)."""
        features = self.target_features(pixel_values, **kwargs)  # (B, N, D), fp32
        num_mask_sets = target_mask[0].size(0) // pixel_values.size(0)
        if num_mask_sets > 1:
            features = features.repeat(num_mask_sets, 1, 1)  # (M*B, N, D): row s*B + b is image b
        targets = gather_patches(features, target_mask)  # (T*M*B, Kt, D)
        return repeat_interleave_batch(targets, features.size(0), repeat=num_context_blocks)

    @torch.no_grad()
    def target_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """`(B, N, D)` fp32 per-patch targets before gathering: the final output layer-normed (official), or with
        `config.target_num_layers = k > 1` the average of the last k layer outputs, each instance-normalised over
        the patches (data2vec), then layer-normed."""
        num_layers = self.config.target_num_layers
        outputs = self.ijepa(pixel_values, output_hidden_states=num_layers > 1, **kwargs)
        if num_layers == 1:
            features = outputs.last_hidden_state
        else:
            # hidden_states = (embeddings, layer 1, ..., layer L), each before the final LayerNorm.
            layers = [hidden.float() for hidden in outputs.hidden_states[-num_layers:]]
            features = torch.stack(
                [F.instance_norm(layer.transpose(1, 2)).transpose(1, 2) for layer in layers]
            ).mean(dim=0)
        # In fp32 under autocast too (CPU autocast would run layer_norm in bf16): the official targets are fp32.
        return F.layer_norm(features.float(), (features.size(-1),), eps=TARGET_LAYER_NORM_EPS)

    def prepare_masks(self, pixel_values, context_mask, target_mask, interpolate_pos_encoding, generator,
                      allow_overlap):
        """`(context_mask, target_mask, patch_grid)` of one forward: the given masks, checked, or sampled on the
        image's patch grid (`(height, width)` in patches) with `config.num_mask_sets * B` rows."""
        context_mask, target_mask = as_mask_list(context_mask), as_mask_list(target_mask)
        if (context_mask is None) != (target_mask is None):
            raise ValueError("Pass both context_mask and target_mask, or neither (then they are sampled).")
        batch_size = pixel_values.size(0) * self.config.num_mask_sets
        patch_grid = self.config.patch_grid
        if interpolate_pos_encoding:
            patch_h, patch_w = self.config.patch_size_hw
            patch_grid = (pixel_values.size(2) // patch_h, pixel_values.size(3) // patch_w)
        if context_mask is None:
            context_mask, target_mask = self.sample_masks(batch_size, generator, patch_grid=patch_grid)
        num_patches = patch_grid[0] * patch_grid[1]
        check_values = value_checks_enabled(self)
        validate_masks(context_mask, batch_size, num_patches, "context_mask", check_values=check_values)
        validate_masks(target_mask, batch_size, num_patches, "target_mask", check_values=check_values)
        allow_overlap = self.config.allow_overlap if allow_overlap is None else allow_overlap
        if check_values and not allow_overlap:
            check_no_overlap(context_mask, target_mask, num_patches)
        return context_mask, target_mask, patch_grid

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        context_mask: torch.Tensor | list[torch.Tensor] | None = None,
        target_mask: torch.Tensor | list[torch.Tensor] | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        allow_overlap: bool | None = None,
        sigreg_seed: int | None = None,
        **kwargs,
    ) -> IJepaForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`(B, num_channels, height, width)`): images.
            context_mask (list of C LongTensors `(B, Kc)`, *optional*): context patches. With
                `config.num_mask_sets = M > 1` both masks have `M * B` rows, set-major (row `s * B + b` is mask set
                `s` of image `b`), and every output's `B` below reads `M * B`.
            target_mask (list of T LongTensors `(B, Kt)`, *optional*): target patches. When both masks are absent they
                are sampled with the config's multi-block sampler (using `generator` if given).
            interpolate_pos_encoding (`bool`, *optional*): images of another size than `config.image_size`. Masks
                then index the image's own patch grid `(height // patch, width // patch)`: sampled masks are drawn on
                it, and the encoders and the predictor resample their position tables to it (bicubic, as
                transformers' encoder does).
            generator (`torch.Generator`, *optional*): randomness for sampled masks.
            allow_overlap (`bool`, *optional*): overrides `config.allow_overlap` for this call (the mask collator sets
                it for batches in which the official relax step let a context overlap its targets).
            sigreg_seed (`int`, *optional*): seed of this step's SIGReg directions (used only with
                `config.sigreg_weight > 0`; the training loop passes one per step, the same on every process). Without
                it the seed is drawn from torch's global RNG (so `torch.manual_seed` makes the call reproducible).

        Returns:
            `IJepaForPreTrainingOutput` (see its docstring for shapes).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) tensor.")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}.")
        return_dict = True if return_dict is None else return_dict
        num_images = pixel_values.size(0)
        context_mask, target_mask, patch_grid = self.prepare_masks(
            pixel_values, context_mask, target_mask, interpolate_pos_encoding, generator, allow_overlap
        )
        batch_size = context_mask[0].size(0)  # mask rows: one per (mask set, image), set-major

        # Targets first, as the official step does: the target encoder's no-grad working memory is freed before the
        # context encoder and predictor start holding activations for backward (lower peak, same numbers).
        targets = self.compute_targets(
            pixel_values, target_mask, len(context_mask), interpolate_pos_encoding=interpolate_pos_encoding
        )
        context_pixels = pixel_values
        if batch_size != num_images:  # the context encoder sees each image once per mask set
            context_pixels = pixel_values.repeat(self.config.num_mask_sets, 1, 1, 1)
        context_outputs = self.context_encoder(
            context_pixels,
            context_mask=context_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        context_hidden_states = context_outputs.last_hidden_state  # (C*B, Kc, D)
        predicted = self.predictor(
            context_hidden_states, context_mask, target_mask, patch_grid=patch_grid
        )  # (T*C*B, Kt, D)
        loss, sigreg = self.pretraining_loss(predicted, targets, context_hidden_states, sigreg_seed)

        output = IJepaForPreTrainingOutput(
            loss=loss,
            predicted_hidden_states=predicted,
            target_hidden_states=targets,
            context_hidden_states=context_hidden_states,
            context_mask=context_mask,
            target_mask=target_mask,
            hidden_states=context_outputs.hidden_states,
            attentions=context_outputs.attentions,
            sigreg=sigreg,
        )
        return output if return_dict else output.to_tuple()

    def pretraining_loss(self, predicted: torch.Tensor, targets: torch.Tensor, context_hidden_states: torch.Tensor,
                         sigreg_seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(loss, sigreg)`: the official prediction loss of `predicted` against `targets` (both `(T*C*B, Kt, D)`),
        plus `config.sigreg_weight * sigreg` of the context outputs `(C*B, Kc, D)` when that weight is > 0 (else
        `sigreg` is None and the loss is exactly the official one)."""
        loss = prediction_loss(predicted, targets, self.config.loss_type)
        if self.config.sigreg_weight <= 0:
            return loss, None
        sigreg = self.sigreg(context_hidden_states, sigreg_seed)
        return loss + self.config.sigreg_weight * sigreg, sigreg

    def sigreg(self, context_hidden_states: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """SIGReg statistic (`sigreg_statistic`) of the context encoder's output `(C * B, Kc, D)`: on its patch
        average per context (`config.sigreg_on = "pooled"`) or on every token (`"tokens"`), with
        `config.sigreg_num_slices` directions drawn from a generator seeded with `seed`."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        directions = sigreg_directions(
            context_hidden_states.size(-1), self.config.sigreg_num_slices, torch.Generator().manual_seed(seed)
        )
        if self.config.sigreg_on == "pooled":
            embeddings = context_hidden_states.mean(dim=1)  # (C*B, D)
        else:
            embeddings = context_hidden_states.reshape(-1, context_hidden_states.size(-1))  # (C*B*Kc, D)
        return sigreg_statistic(embeddings, directions)


class IJepaForImageClassification(IJepaPreTrainedModel):
    """Encoder plus a linear head on the mean-pooled patch features; parameter names equal transformers'
    `IJepaForImageClassification` (`ijepa.*`, `classifier.*`). From a pretraining checkpoint it loads the target
    encoder."""

    _keys_to_ignore_on_load_unexpected = [r"context_encoder\.", r"predictor\."]

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ijepa = IJepaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        """Returns `ImageClassifierOutput` with `logits` `(batch, num_labels)` and, with `labels`, the loss."""
        return_dict = True if return_dict is None else return_dict
        outputs = self.ijepa(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "IJepaPreTrainedModel",
    "IJepaModel",
    "IJepaPredictor",
    "IJepaForPreTraining",
    "IJepaForPreTrainingOutput",
    "IJepaForImageClassification",
    "ema_momentum",
    "gather_patches",
    "prediction_loss",
    "sigreg_directions",
    "sigreg_statistic",
    "repeat_interleave_batch",
    "resample_position_embeddings",
    "sincos_position_embeddings",
]
