"""I-JEPA configuration: the encoder fields of transformers' `IJepaConfig` plus the predictor and masking knobs.

Every checkpoint written with this config is a valid transformers `ijepa` checkpoint (same `model_type`, same
encoder fields); the extra fields are ignored by plain transformers.

Defaults come from the paper's ViT-H/14 ImageNet-1k run, i.e. the official `configs/in1k_vith14_ep300.yaml`
of facebookresearch/ijepa (Assran et al., CVPR 2023).

This file imports only `torch`-free transformers/huggingface_hub modules so the Hub can load it as custom code.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import IJepaConfig as TransformersIJepaConfig

LOSS_TYPES = ("smooth_l1", "mse")
# "official": the sampler of src/masks/multiblock.py with its quirks; "corrected": the quirks fixed (see masking_ijepa).
MASK_SAMPLING_MODES = ("official", "corrected")
# What SIGReg regularises: the context encoder's patch-averaged embeddings, or each of its patch tokens.
SIGREG_SAMPLES = ("pooled", "tokens")


@strict
class IJepaConfig(TransformersIJepaConfig):
    r"""
    Configuration of an I-JEPA model: context/target encoder (a ViT without CLS token), predictor and the multi-block
    mask sampler. Subclass of `transformers.IJepaConfig` with `model_type = "ijepa"`.

    Encoder fields are those of `transformers.IJepaConfig`; the I-JEPA defaults differ in `layer_norm_eps=1e-6`
    (the official `partial(nn.LayerNorm, eps=1e-6)`) and in the ViT-H/14 sizes.

    Predictor (official `VisionTransformerPredictor`, `meta.pred_*` in the yaml files):
        pred_hidden_size (`int`, defaults to 384): width of the predictor (`pred_emb_dim`).
        pred_num_hidden_layers (`int`, defaults to 12): depth of the predictor (`pred_depth`).
        pred_num_attention_heads (`int`, *optional*): heads of the predictor; `None` means `num_attention_heads`,
            as the official `init_model` passes the encoder's head count to the predictor.
        pred_mlp_ratio (`float`, defaults to 4.0): MLP width of predictor layers relative to `pred_hidden_size`.

    Multi-block masking (official `MaskCollator`, `mask.*` in the yaml files):
        num_context_blocks (`int`, defaults to 1): `num_enc_masks`.
        context_block_scale (`tuple[float, float]`, defaults to `(0.85, 1.0)`): `enc_mask_scale`.
        num_target_blocks (`int`, defaults to 4): `num_pred_masks`.
        target_block_scale (`tuple[float, float]`, defaults to `(0.15, 0.2)`): `pred_mask_scale`.
        target_block_aspect_ratio (`tuple[float, float]`, defaults to `(0.75, 1.5)`): `aspect_ratio`.
        min_keep (`int`, defaults to 10): a block is accepted only with *more* than `min_keep` patches.
        allow_overlap (`bool`, defaults to `False`): whether the context may overlap the target blocks.
        mask_sampling (`str`, defaults to `"official"`): `"official"` reproduces the official sampler and its quirks;
            `"corrected"` lets blocks touch the last row/column, span the full grid, and truncates masks to the
            batch minimum by a random subset instead of raster order.

    Objective:
        loss_type (`str`, defaults to `"smooth_l1"`): `"smooth_l1"` is what the official `train.py` optimises
            (`F.smooth_l1_loss`, beta 1); `"mse"` is the L2 loss written in the paper (Eq. 1, averaged).
        rescale_init_by_depth (`bool`, defaults to `False`): divide each layer's attention-output and second MLP
            weights by `sqrt(2 * layer_index)` at init, as the official model classes do. The official training
            helper re-initialises every linear layer right after, undoing it, so the released runs started without it.

    Options beyond the paper (off by default; docs/evaluation.md measures them on small data):
        num_mask_sets (`int`, defaults to 1): mask sets per image (data2vec 2.0's multi-mask): the target encoder runs
            once per image and its targets serve `num_mask_sets` independent context/target mask sets, so one image
            gives `num_mask_sets` predictions; masks then have batch `num_mask_sets * B` (set-major).
        target_num_layers (`int`, defaults to 1): targets are the average of the target encoder's last
            `target_num_layers` layer outputs, each instance-normalised over the patches, then layer-normed
            (data2vec-style). 1 is the official target: the final (layer-normed) output, layer-normed again.
        sigreg_weight (`float`, defaults to 0.0): weight of LeJEPA's SIGReg term (Balestriero & LeCun 2025) added to
            the loss: the context encoder's embeddings are projected on `sigreg_num_slices` random unit directions
            (drawn anew every step from a seeded generator) and each 1-D projection's empirical characteristic
            function is compared with the standard Gaussian's (Epps-Pulley, `modeling_ijepa.sigreg_statistic`).
            0 (default) computes nothing: the official loss, bit for bit.
        sigreg_num_slices (`int`, defaults to 256): random directions of SIGReg.
        sigreg_on (`str`, defaults to `"pooled"`): SIGReg on the average over each context's patches (`"pooled"`,
            `(C * B, D)` samples) or on every context patch token (`"tokens"`, `(C * B * Kc, D)` samples).
    """

    model_type = "ijepa"

    # ViT-H/14 at 224 px (official `vit_huge`, patch 14).
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    intermediate_size: int = 5120
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 14
    qkv_bias: bool = True

    pred_hidden_size: int = 384
    pred_num_hidden_layers: int = 12
    pred_num_attention_heads: int | None = None
    pred_mlp_ratio: float | int = 4.0

    num_context_blocks: int = 1
    context_block_scale: tuple[float, float] | list[float] = (0.85, 1.0)
    num_target_blocks: int = 4
    target_block_scale: tuple[float, float] | list[float] = (0.15, 0.2)
    target_block_aspect_ratio: tuple[float, float] | list[float] = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    mask_sampling: str = "official"

    loss_type: str = "smooth_l1"
    rescale_init_by_depth: bool = False

    num_mask_sets: int = 1
    target_num_layers: int = 1
    sigreg_weight: float = 0.0
    sigreg_num_slices: int = 256
    sigreg_on: str = "pooled"

    def __post_init__(self, **kwargs):
        if self.pred_num_attention_heads is None:
            self.pred_num_attention_heads = self.num_attention_heads
        # JSON round trips turn tuples into lists; keep one canonical type.
        for name in ("context_block_scale", "target_block_scale", "target_block_aspect_ratio"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(float(v) for v in value))
        super().__post_init__(**kwargs)

    # ---- derived geometry -------------------------------------------------------------------------------------
    @property
    def image_size_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def patch_size_hw(self) -> tuple[int, int]:
        size = self.patch_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(height, width) of the patch grid, e.g. (16, 16) for ViT-H/14 at 224 px."""
        (h, w), (ph, pw) = self.image_size_hw, self.patch_size_hw
        return h // ph, w // pw

    @property
    def num_patches(self) -> int:
        h, w = self.patch_grid
        return h * w

    # ---- validation (run by @strict at construction) ----------------------------------------------------------
    def validate_ijepa(self):
        (h, w), (ph, pw) = self.image_size_hw, self.patch_size_hw
        if h % ph or w % pw:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: pick an image size "
                f"that is a multiple of the patch size (e.g. {(h // ph) * ph})."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}: "
                "change one of them so that the head dimension is an integer."
            )
        pred_heads = self.pred_num_attention_heads or self.num_attention_heads
        if self.pred_hidden_size % pred_heads:
            raise ValueError(
                f"pred_hidden_size={self.pred_hidden_size} is not divisible by pred_num_attention_heads={pred_heads} "
                "(which defaults to num_attention_heads): set pred_num_attention_heads to a divisor of pred_hidden_size."
            )
        for name in ("num_context_blocks", "num_target_blocks", "pred_num_hidden_layers", "pred_hidden_size",
                     "num_mask_sets", "target_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("context_block_scale", "target_block_scale"):
            low, high = getattr(self, name)
            if not (0.0 < low <= high <= 1.0):
                raise ValueError(
                    f"{name}={tuple(getattr(self, name))} must satisfy 0 < min <= max <= 1 (fractions of the patch grid)."
                )
        low, high = self.target_block_aspect_ratio
        if not (0.0 < low <= high):
            raise ValueError(f"target_block_aspect_ratio={(low, high)} must satisfy 0 < min <= max.")
        if self.min_keep < 0 or self.min_keep >= h // ph * (w // pw):
            raise ValueError(
                f"min_keep={self.min_keep} must be in [0, {h // ph * (w // pw)}) for a {h // ph}x{w // pw} patch grid: "
                "lower min_keep or use a larger image / smaller patch."
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {LOSS_TYPES}.")
        if self.mask_sampling not in MASK_SAMPLING_MODES:
            raise ValueError(f"mask_sampling={self.mask_sampling!r} is not one of {MASK_SAMPLING_MODES}.")
        if self.target_num_layers > self.num_hidden_layers:
            raise ValueError(
                f"target_num_layers={self.target_num_layers} exceeds num_hidden_layers={self.num_hidden_layers}: "
                "targets can average at most every layer of the encoder."
            )
        if self.pred_mlp_ratio <= 0:
            raise ValueError(f"pred_mlp_ratio must be positive, got {self.pred_mlp_ratio}.")
        if self.sigreg_weight < 0 or self.sigreg_num_slices < 1 or self.sigreg_on not in SIGREG_SAMPLES:
            raise ValueError(
                f"SIGReg settings sigreg_weight={self.sigreg_weight}, sigreg_num_slices={self.sigreg_num_slices}, "
                f"sigreg_on={self.sigreg_on!r}: the weight must be >= 0 (0 disables it), the slices >= 1 and "
                f"sigreg_on one of {SIGREG_SAMPLES}."
            )

    def predictor_layer_config(self) -> TransformersIJepaConfig:
        """A plain encoder config at the predictor's width, used to build the predictor's `IJepaLayer`s."""
        layer_config = TransformersIJepaConfig(
            hidden_size=self.pred_hidden_size,
            num_hidden_layers=self.pred_num_hidden_layers,
            num_attention_heads=self.pred_num_attention_heads,
            intermediate_size=int(self.pred_hidden_size * self.pred_mlp_ratio),
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            layer_norm_eps=self.layer_norm_eps,
            qkv_bias=self.qkv_bias,
        )
        layer_config._attn_implementation = self._attn_implementation
        return layer_config


# Sizes of the paper (Table 1 / Appendix A) and the official `src/models/vision_transformer.py` constructors.
# ViT-H/14, ViT-H/16-448 and ViT-g/16 predictors come from the released yaml configs; ViT-B/16 and ViT-L/16 were not
# released with configs: the paper's predictor-depth ablation (ViT-L/16) uses depth 12 and width 384, which we adopt.
_ENCODER_SIZES = {
    # name: (hidden_size, num_hidden_layers, num_attention_heads, mlp hidden)
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
    "giant": (1408, 40, 16, 6144),  # official vit_giant: mlp_ratio 48/11 -> int(1408 * 48 / 11) = 6144
}

PRESETS: dict[str, dict] = {
    "vit-base-16": dict(size="base", patch_size=16, image_size=224, pred_hidden_size=384, pred_num_hidden_layers=12),
    "vit-large-16": dict(size="large", patch_size=16, image_size=224, pred_hidden_size=384, pred_num_hidden_layers=12),
    "vit-huge-14": dict(size="huge", patch_size=14, image_size=224, pred_hidden_size=384, pred_num_hidden_layers=12),
    "vit-huge-16-448": dict(size="huge", patch_size=16, image_size=448, pred_hidden_size=384, pred_num_hidden_layers=12),
    "vit-giant-16": dict(size="giant", patch_size=16, image_size=224, pred_hidden_size=384, pred_num_hidden_layers=16),
    # Used by the benchmarks (issue: ViT-S/16 at 224 px); not a paper run.
    "vit-small-16": dict(size="small", patch_size=16, image_size=224, pred_hidden_size=384, pred_num_hidden_layers=6),
    # A CPU-sized model for tests, demos and the Fashion-MNIST benchmark: 32 px images, 4 px patches (8x8 grid).
    # min_keep 4 because 8x8 grids cannot hold target blocks of more than 10 patches at the paper's scales.
    "tiny-cpu": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        patch_size=4, image_size=32, pred_hidden_size=64, pred_num_hidden_layers=3, pred_num_attention_heads=4,
        min_keep=4,
    ),
}


def ijepa_config_from_preset(name: str, **overrides) -> IJepaConfig:
    """Build an `IJepaConfig` for one of `PRESETS` (e.g. `"vit-huge-14"`), with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown I-JEPA preset {name!r}; choose one of {sorted(PRESETS)}.")
    spec = dict(PRESETS[name])
    size = spec.pop("size", None)
    if size is not None:
        hidden, layers, heads, mlp = _ENCODER_SIZES[size]
        spec = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, **spec)
    spec.update(overrides)
    return IJepaConfig(**spec)


__all__ = ["IJepaConfig", "PRESETS", "ijepa_config_from_preset"]
