"""A baseline I-JEPA pretraining step written the way the official implementation computes it.

Used only by `scripts/benchmark.py` as the reference point for speed, memory and numerics. It follows the structure of
facebookresearch/ijepa (`src/models/vision_transformer.py`, `src/masks/multiblock.py`, `src/train.py`), re-written
here from the paper and that code's documented behaviour, without tests or optimisations:

* naive softmax attention from one fused `qkv` projection (the attention matrix is materialised);
* the predictor repeats the context once per target block;
* the target branch runs under `torch.no_grad`, followed by a feature layer norm without affine parameters;
* the EMA update loops over parameters in Python;
* the mask sampler loops over samples and blocks in Python, retrying one draw at a time.

Weights come from this package's `IJepaForPreTraining` through `load_from_ours` (the only name map: the three
`q_proj/k_proj/v_proj` tensors are stacked into one `qkv`), so both steps start from identical parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Official models use `partial(nn.LayerNorm, eps=1e-6)` and build targets with `F.layer_norm` at PyTorch's default eps.
LAYER_NORM_EPS = 1e-6
# Official `_sample_block_mask`: after 20 failed draws, one acceptable region fewer is enforced.
DRAWS_PER_RELAX_LEVEL = 20


# ---------------------------------------------------------------------------------------------------------------------
# Masks


def keep_tokens(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """`(B, N, D)` and M masks `(B, K)` -> `(M * B, K, D)`, mask-major (official `apply_masks`)."""
    out = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, dim=1, index=index))
    return torch.cat(out, dim=0)


def repeat_chunks(x: torch.Tensor, chunk: int, repeat: int) -> torch.Tensor:
    """Repeat each chunk of `chunk` rows `repeat` times, chunk by chunk (official `repeat_interleave_batch`)."""
    num_chunks = len(x) // chunk
    return torch.cat(
        [torch.cat([x[i * chunk:(i + 1) * chunk] for _ in range(repeat)], dim=0) for i in range(num_chunks)], dim=0
    )


class LoopMaskSampler:
    """Multi-block masks one sample and one draw at a time, as the official `MaskCollator` does.

    Uses an explicit `torch.Generator` for every draw (the official code takes block corners from the global RNG).
    """

    def __init__(self, grid_height, grid_width, num_context_blocks, context_block_scale, num_target_blocks,
                 target_block_scale, target_block_aspect_ratio, min_keep, allow_overlap=False):
        self.height, self.width = grid_height, grid_width
        self.num_context_blocks, self.context_block_scale = num_context_blocks, context_block_scale
        self.num_target_blocks, self.target_block_scale = num_target_blocks, target_block_scale
        self.aspect_ratio, self.min_keep, self.allow_overlap = target_block_aspect_ratio, min_keep, allow_overlap

    @classmethod
    def from_config(cls, config):
        return cls(*config.patch_grid, config.num_context_blocks, tuple(config.context_block_scale),
                   config.num_target_blocks, tuple(config.target_block_scale),
                   tuple(config.target_block_aspect_ratio), config.min_keep, config.allow_overlap)

    def block_size(self, generator, scale, aspect_ratio):
        u = torch.rand(1, generator=generator).item()
        max_keep = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
        h = int(round(math.sqrt(max_keep * ratio)))
        w = int(round(math.sqrt(max_keep / ratio)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1
        return h, w

    def block(self, generator, size, regions=None):
        h, w = size
        failures, relax = 0, 0
        while True:
            top = torch.randint(0, self.height - h, (1,), generator=generator).item()
            left = torch.randint(0, self.width - w, (1,), generator=generator).item()
            mask = torch.zeros(self.height, self.width, dtype=torch.int32)
            mask[top:top + h, left:left + w] = 1
            if regions is not None:
                for region in regions[:max(len(regions) - relax, 0)]:
                    mask *= region
            indices = torch.nonzero(mask.flatten()).squeeze(1)
            if len(indices) > self.min_keep:
                break
            failures += 1
            if failures == DRAWS_PER_RELAX_LEVEL:
                failures, relax = 0, relax + 1
        complement = torch.ones(self.height, self.width, dtype=torch.int32)
        complement[top:top + h, left:left + w] = 0
        return indices, complement

    def __call__(self, batch_size, generator):
        target_size = self.block_size(generator, self.target_block_scale, self.aspect_ratio)
        context_size = self.block_size(generator, self.context_block_scale, (1.0, 1.0))
        targets, contexts = [], []
        for _ in range(batch_size):
            sample_targets, complements = [], []
            for _ in range(self.num_target_blocks):
                indices, complement = self.block(generator, target_size)
                sample_targets.append(indices)
                complements.append(complement)
            regions = None if self.allow_overlap else complements
            sample_contexts = [self.block(generator, context_size, regions)[0] for _ in range(self.num_context_blocks)]
            targets.append(sample_targets)
            contexts.append(sample_contexts)
        keep_target = min(len(m) for sample in targets for m in sample)
        keep_context = min(len(m) for sample in contexts for m in sample)
        target_mask = [torch.stack([sample[j][:keep_target] for sample in targets]) for j in range(self.num_target_blocks)]
        context_mask = [
            torch.stack([sample[j][:keep_context] for sample in contexts]) for j in range(self.num_context_blocks)
        ]
        return context_mask, target_mask


# ---------------------------------------------------------------------------------------------------------------------
# Models


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nh, N, hs)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_hidden, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """ViT without CLS token, fixed position table, optional token masks."""

    def __init__(self, config):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size_hw
        self.patch_embed = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(dim, config.num_attention_heads, config.intermediate_size, config.qkv_bias)
             for _ in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x, masks=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        if masks is not None:
            x = keep_tokens(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self, config):
        super().__init__()
        width = config.pred_hidden_size
        self.predictor_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, width), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            [Block(width, config.pred_num_attention_heads, int(width * config.pred_mlp_ratio), config.qkv_bias)
             for _ in range(config.pred_num_hidden_layers)]
        )
        self.predictor_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(width, config.hidden_size)

    def forward(self, x, masks_x, masks):
        B = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x = x + keep_tokens(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        num_context = x.shape[1]
        pos = keep_tokens(self.predictor_pos_embed.repeat(B, 1, 1), masks)
        pos = repeat_chunks(pos, B, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
        x = x.repeat(len(masks), 1, 1)
        x = torch.cat([x, pred_tokens], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, num_context:])


class OfficialStylePretraining(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.predictor = Predictor(config)
        self.target_encoder = Encoder(config)
        for p in self.target_encoder.parameters():
            p.requires_grad = False

    def loss(self, imgs, masks_enc, masks_pred):
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            B = len(h)
            h = keep_tokens(h, masks_pred)
            h = repeat_chunks(h, B, repeat=len(masks_enc))
        z = self.encoder(imgs, masks_enc)
        z = self.predictor(z, masks_enc, masks_pred)
        if self.config.loss_type == "smooth_l1":
            return F.smooth_l1_loss(z, h)
        return F.mse_loss(z, h)

    @torch.no_grad()
    def momentum_update(self, m):
        for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
            param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)


# ---------------------------------------------------------------------------------------------------------------------
# Weights from this package's IJepaForPreTraining


def _encoder_state(state, prefix, num_layers, blocks="blocks"):
    """Map one of our encoders' (or the predictor's) layers onto the official names."""
    out = {}
    for i in range(num_layers):
        src, dst = f"{prefix}layers.{i}.", f"{blocks}.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([state[f"{src}attention.{n}_proj.{kind}"] for n in "qkv"])
            out[f"{dst}attn.proj.{kind}"] = state[f"{src}attention.o_proj.{kind}"]
        for ours, theirs in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{dst}{theirs}.{kind}"] = state[f"{src}{ours}.{kind}"]
    return out


def load_from_ours(baseline: OfficialStylePretraining, ours) -> None:
    """Copy the weights of an `IJepaForPreTraining` into the baseline (strict)."""
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    config = ours.config
    mapped = {}
    for ours_prefix, theirs in (("context_encoder.", "encoder."), ("ijepa.", "target_encoder.")):
        layers = _encoder_state(state, ours_prefix, config.num_hidden_layers)
        mapped.update({theirs + k: v for k, v in layers.items()})
        mapped[theirs + "patch_embed.weight"] = state[ours_prefix + "embeddings.patch_embeddings.projection.weight"]
        mapped[theirs + "patch_embed.bias"] = state[ours_prefix + "embeddings.patch_embeddings.projection.bias"]
        mapped[theirs + "pos_embed"] = state[ours_prefix + "embeddings.position_embeddings"]
        mapped[theirs + "norm.weight"] = state[ours_prefix + "layernorm.weight"]
        mapped[theirs + "norm.bias"] = state[ours_prefix + "layernorm.bias"]
    layers = _encoder_state(state, "predictor.", config.pred_num_hidden_layers, blocks="predictor_blocks")
    mapped.update({"predictor." + k: v for k, v in layers.items()})
    for ours_name, theirs in (("input_projection", "predictor_embed"), ("layernorm", "predictor_norm"),
                              ("output_projection", "predictor_proj")):
        for kind in ("weight", "bias"):
            mapped[f"predictor.{theirs}.{kind}"] = state[f"predictor.{ours_name}.{kind}"]
    mapped["predictor.mask_token"] = state["predictor.mask_token"]
    mapped["predictor.predictor_pos_embed"] = state["predictor.position_embeddings"]
    baseline.load_state_dict(mapped, strict=True)
