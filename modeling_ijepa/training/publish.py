"""What a finished run publishes: its model card and the Hub upload of its model folder."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import CHECKPOINT_PREFIX, TMP_CHECKPOINT_PREFIX


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` when it looks like a Hub repo id rather than a local path (card metadata wants Hub ids only)."""
    if not name or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


def write_model_card(output_dir: Path, config, model_args, data_args, args, results: dict, lr_rule: str) -> Path:
    """Write `output_dir/README.md`: a pretraining model card filled with this run's facts."""
    from ..cards import PROJECT_LICENSE, Provenance, TrainingFacts, pretraining_card, save_card

    training = TrainingFacts(
        dataset=f"{data_args.dataset_name} (split {data_args.train_split})",
        dataset_id=_hub_id_or_none(data_args.dataset_name),
        steps=results["global_step"],
        batch_size=results["global_batch_size"],
        recipe=(
            f"AdamW, {lr_rule}; weight decay cosine {args.weight_decay} -> {args.final_weight_decay}; EMA "
            f"{args.ema_momentum_start} -> {args.ema_momentum_end}; multi-block masks "
            f"({config.num_target_blocks} targets of scale {tuple(config.target_block_scale)}, context scale "
            f"{tuple(config.context_block_scale)}); {config.loss_type} loss on layer-normed targets; "
            f"precision {args.mixed_precision or 'no'}"
        ),
        final_loss=results["final_loss"],
        hardware=f"{results['world_size']} process(es)",
    )
    provenance = Provenance(source="trained with scripts/pretrain.py of modeling-ijepa", license=PROJECT_LICENSE,
                            base_model=_hub_id_or_none(model_args.model_name_or_path))
    card = pretraining_card(config, provenance=provenance, training=training, repo_id=args.hub_model_id)
    return save_card(card, output_dir)


def push_run_to_hub(output_dir: Path, args) -> str:
    """Upload the run's model directory (resumable `checkpoint-*` states excluded) in one commit."""
    from ..hub import push_folder_to_hub

    repo_id = args.hub_model_id or output_dir.resolve().name
    info = push_folder_to_hub(
        output_dir, repo_id, private=args.hub_private_repo or None, token=args.hub_token,
        commit_message="Upload I-JEPA pretraining run",
        exclude=(f"{CHECKPOINT_PREFIX}*", f"{TMP_CHECKPOINT_PREFIX}*", ".old-*", "runs"),
    )
    return info.commit_url
