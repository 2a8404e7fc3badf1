"""Converting Meta's official I-JEPA checkpoints to Hub-ready directories and back: the engine of
`scripts/convert_ijepa_checkpoint.py`.

The key maps and the verification math live in `convert_official.py`; this module orchestrates a conversion run:
infer, load strictly, verify against a reference forward on the official tensors and against a reload of what was
written, write model cards and a conversion report, and optionally upload (`run_conversion`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from . import IJepaForPreTraining
from . import convert_official as conv
from .cards import (
    META_WEIGHTS_LICENSE,
    Provenance,
    TrainingFacts,
    architecture_name,
    encoder_card,
    pretraining_card,
    save_card,
)
from .hub import push_folder_to_hub

# Official release file names start with the pretraining data (README of facebookresearch/ijepa).
DATASETS_BY_FILE_PREFIX = {
    "IN1K": ("ImageNet-1k (train)", "ILSVRC/imagenet-1k"),
    "IN22K": ("ImageNet-22k", None),  # no canonical Hub copy to point the metadata at
}
REPORT_FILE = "conversion_report.json"


@dataclass
class ConversionArguments:
    checkpoint: str = field(
        metadata={"help": "Official .pth.tar file; or (for --to_official / --export_encoder) one of our "
                          "IJepaForPreTraining directories or Hub ids."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where to write the IJepaForPreTraining directory."})
    to_official: bool = field(default=False, metadata={"help": "Convert our checkpoint back to the official format."})
    output_file: str | None = field(default=None, metadata={"help": "With --to_official: the .pth.tar to write."})
    no_ddp_prefix: bool = field(
        default=False, metadata={"help": "With --to_official: write keys without the 'module.' prefix the official "
                                         "train.py (DistributedDataParallel) saves and loads."}
    )
    epoch: int = field(default=0, metadata={"help": "With --to_official: the 'epoch' field written to the file."})
    export_encoder: str | None = field(
        default=None, metadata={"help": "Also write one encoder as a plain transformers `ijepa` checkpoint here."}
    )
    which: str = field(
        default="target", metadata={"help": "Encoder to export: 'target' (EMA, evaluated in the paper) or 'context'."}
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Encoder heads (default: the official width->heads table)."}
    )
    pred_num_attention_heads: int | None = field(
        default=None, metadata={"help": "Predictor heads (default: the encoder's, as the official init_model does)."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Pretraining data for the card (default: from the IN1K/IN22K file name)."}
    )
    dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for the card's `datasets`."})
    license: str = field(default=META_WEIGHTS_LICENSE, metadata={"help": "License written into the cards."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the written directories (one commit each)."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Repo for --output_dir with --push_to_hub."})
    encoder_repo_id: str | None = field(default=None, metadata={"help": "Repo for --export_encoder with --push_to_hub."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repos as private."})

    def __post_init__(self):
        if self.which not in ("target", "context"):
            raise ValueError(f"--which {self.which!r}: choose 'target' or 'context'.")
        is_official = Path(self.checkpoint).is_file()
        if not is_official and self.checkpoint.endswith((".pth", ".pth.tar", ".pt", ".tar")):
            raise FileNotFoundError(f"--checkpoint {self.checkpoint} does not exist.")
        if self.to_official:
            if is_official:
                raise ValueError("--to_official converts one of our directories; --checkpoint is a file.")
            if not self.output_file:
                raise ValueError("--to_official needs --output_file FILE.pth.tar.")
        elif is_official and not self.output_dir:
            raise ValueError("Converting an official checkpoint needs --output_dir DIR.")
        elif not is_official and not (self.output_dir or self.export_encoder):
            raise ValueError(f"{self.checkpoint} is not a file; to export an encoder from one of our directories pass "
                             "--export_encoder DIR2 (or --to_official --output_file FILE).")
        if self.push_to_hub:
            if self.output_dir and not self.hub_repo_id and not self.to_official:
                raise ValueError("--push_to_hub needs --hub_repo_id for --output_dir.")
            if self.export_encoder and not self.encoder_repo_id:
                raise ValueError("--push_to_hub needs --encoder_repo_id for --export_encoder.")


def _round_floats(values: dict) -> dict:
    return {name: float(f"{value:.3g}") for name, value in values.items()}


def official_training_facts(path: Path, checkpoint: dict, args: ConversionArguments) -> TrainingFacts:
    """What the official file says about its run (epoch, per-GPU batch size x world size, last-epoch mean loss)."""
    prefix = re.match(r"(IN\d+K)", path.name.upper())
    dataset, dataset_id = DATASETS_BY_FILE_PREFIX.get(prefix.group(1) if prefix else "", (None, None))
    batch = checkpoint.get("batch_size")
    world = checkpoint.get("world_size")
    loss = checkpoint.get("loss")
    return TrainingFacts(
        dataset=args.dataset or dataset or "unknown (pass --dataset)",
        dataset_id=args.dataset_id or dataset_id,
        epochs=checkpoint.get("epoch"),
        batch_size=int(batch * world) if batch is not None and world is not None else batch,
        recipe="the official facebookresearch/ijepa recipe for this model (its configs/*.yaml)",
        final_loss=float(loss) if loss is not None else None,
    )


def convert_official(args: ConversionArguments) -> tuple[IJepaForPreTraining, dict, Provenance, TrainingFacts]:
    path = Path(args.checkpoint)
    checkpoint = conv.load_official_checkpoint(path)
    model, had_prefix = conv.official_to_model(checkpoint, args.num_attention_heads, args.pred_num_attention_heads)
    inputs = conv.verification_inputs(model.config)
    # 1. Our model computes the official function: compare with the reference forward on the official tensors.
    vs_official = conv.max_abs_diffs(conv.model_outputs(model, *inputs), conv.official_outputs(checkpoint, model.config, *inputs))
    conv.check_diffs(vs_official, conv.OUTPUT_ATOL, "converted model vs official reference forward")
    # 2. The reverse map gives the official tensors back, bit for bit.
    back = conv.model_to_official(model, ddp_prefix=had_prefix)
    for section in conv.SECTION_PREFIXES:
        conv.assert_state_dicts_equal(checkpoint[section], back[section], f"official -> ours -> official '{section}'")
    report = {"source": path.name, "ddp_prefix": had_prefix, "epoch": checkpoint.get("epoch"),
              "max_abs_diff_vs_official_reference": vs_official, "reverse_conversion_bitwise_equal": True}
    print(f"converted {path.name}: {architecture_name(model.config)}")
    print(f"  max abs diff vs official reference forward: {vs_official}")
    provenance = Provenance(
        source=f"Converted from Meta's official I-JEPA checkpoint `{path.name}` (facebookresearch/ijepa"
               f"{', epoch ' + str(checkpoint['epoch']) if 'epoch' in checkpoint else ''}) with "
               "`scripts/convert_ijepa_checkpoint.py`.",
        license=args.license,
        notes=[
            f"Verified: max abs difference to a reference forward pass on the official tensors "
            f"{_round_floats(vs_official)} (float32); the reverse conversion reproduces the official tensors bit for bit.",
        ],
    )
    return model, report, provenance, official_training_facts(path, checkpoint, args)


def save_pretraining_dir(model, output_dir: Path, report: dict, provenance, training, repo_id) -> dict:
    model.save_pretrained(output_dir)
    reloaded = IJepaForPreTraining.from_pretrained(output_dir).eval()
    conv.assert_state_dicts_equal(model.state_dict(), reloaded.state_dict(), f"reload of {output_dir}")
    inputs = conv.verification_inputs(model.config)
    diffs = conv.max_abs_diffs(conv.model_outputs(model, *inputs), conv.model_outputs(reloaded, *inputs))
    conv.check_diffs(diffs, 0.0, f"reload of {output_dir}")
    report["max_abs_diff_after_reload"] = diffs
    save_card(pretraining_card(model.config, provenance=provenance, training=training, repo_id=repo_id), output_dir)
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output_dir} (reloaded: max abs diffs {diffs})")
    return diffs


def save_encoder_dir(model, which: str, directory: Path, provenance, training, repo_id, base_model) -> float:
    encoder = conv.export_encoder(model, which)
    encoder.save_pretrained(directory)
    conv.eval_image_processor(model.config).save_pretrained(directory)
    reloaded = transformers.IJepaModel.from_pretrained(directory).eval()
    conv.assert_state_dicts_equal(encoder.state_dict(), reloaded.state_dict(), f"reload of {directory}")
    pixel_values, _, _ = conv.verification_inputs(model.config)
    source = model.ijepa if which == "target" else model.context_encoder
    with torch.no_grad():
        diff = float((source(pixel_values).last_hidden_state - reloaded(pixel_values).last_hidden_state).abs().max())
    conv.check_diffs({f"{which} encoder": diff}, 0.0, f"exported encoder {directory}")
    encoder_provenance = Provenance(
        source=provenance.source + f" The {which} encoder was then exported on its own.",
        license=provenance.license, base_model=base_model,
        notes=provenance.notes + [f"Exported {which} encoder reloaded with transformers.IJepaModel: max abs "
                                  f"difference {diff} to the pretraining model's {which} encoder."],
    )
    save_card(encoder_card(model.config, which=which, provenance=encoder_provenance, training=training,
                           repo_id=repo_id), directory)
    print(f"wrote {directory} ({which} encoder; reloaded: max abs diff {diff})")
    return diff


def to_official(args: ConversionArguments) -> dict:
    model = IJepaForPreTraining.from_pretrained(args.checkpoint).eval()
    checkpoint = conv.model_to_official(model, ddp_prefix=not args.no_ddp_prefix, epoch=args.epoch)
    output_file = Path(args.output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output_file)
    written = conv.load_official_checkpoint(output_file)
    again, _ = conv.official_to_model(written, model.config.num_attention_heads, model.config.pred_num_attention_heads)
    conv.assert_state_dicts_equal(model.state_dict(), again.state_dict(), f"ours -> {output_file} -> ours")
    inputs = conv.verification_inputs(model.config)
    diffs = conv.max_abs_diffs(conv.model_outputs(model, *inputs), conv.official_outputs(written, model.config, *inputs))
    conv.check_diffs(diffs, conv.OUTPUT_ATOL, f"{output_file} (reference forward) vs our model")
    print(f"wrote {output_file}: max abs diff of the official reference forward on it vs our model {diffs}")
    return {"output_file": str(output_file), "max_abs_diff_vs_official_reference": diffs}


def export_from_directory(args: ConversionArguments):
    """(model, provenance, training facts) of one of our pretraining directories (or Hub ids)."""
    model = IJepaForPreTraining.from_pretrained(args.checkpoint).eval()
    provenance = Provenance(source=f"Exported from the I-JEPA pretraining checkpoint `{args.checkpoint}`.",
                            license=args.license, base_model=args.hub_repo_id)
    training = TrainingFacts(dataset=args.dataset, dataset_id=args.dataset_id) if args.dataset else None
    return model, provenance, training


def push_converted(args: ConversionArguments, report: dict) -> None:
    """Upload the written directories, one commit each (after everything was written and verified: a failed upload
    leaves the directories as they are)."""
    if args.output_dir:
        info = push_folder_to_hub(args.output_dir, args.hub_repo_id, private=args.private,
                                  commit_message=f"Add I-JEPA pretraining checkpoint converted from {args.checkpoint}")
        report["hub_commit"] = info.commit_url
    if args.export_encoder:
        info = push_folder_to_hub(args.export_encoder, args.encoder_repo_id, private=args.private,
                                  commit_message=f"Add I-JEPA {args.which} encoder exported from {args.checkpoint}")
        report["encoder_hub_commit"] = info.commit_url


def run_conversion(args: ConversionArguments) -> dict:
    """Convert, verify, write (and with --push_to_hub upload) what `args` asks for; returns the report."""
    if args.to_official:
        return to_official(args)
    report: dict = {}
    if Path(args.checkpoint).is_file():
        model, report, provenance, training = convert_official(args)
    else:
        model, provenance, training = export_from_directory(args)
    if args.output_dir:
        save_pretraining_dir(model, Path(args.output_dir), report, provenance, training, args.hub_repo_id)
    if args.export_encoder:
        base_model = args.hub_repo_id if args.push_to_hub else provenance.base_model
        report["encoder_max_abs_diff_after_reload"] = save_encoder_dir(
            model, args.which, Path(args.export_encoder), provenance, training, args.encoder_repo_id, base_model
        )
    if args.push_to_hub:
        push_converted(args, report)
    return report
