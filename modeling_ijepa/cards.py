"""Model cards for this project's Hub outputs, rendered from the Jinja templates in `modeling_ijepa/model_cards/` with
`huggingface_hub.ModelCard` and validated YAML metadata.

Three kinds, one function each; every script that writes a directory meant for the Hub calls one and then
`save_card(card, directory)`:

* `pretraining_card` — an `IJepaForPreTraining` directory (context encoder, predictor, EMA target encoder; custom
  code): `pipeline_tag: image-feature-extraction`.
* `encoder_card` — one encoder exported as a plain transformers `ijepa` checkpoint: `image-feature-extraction`.
* `classifier_card` — a fine-tuned / linear-probed `IJepaForImageClassification`: `image-classification`.

The scripts pass the run's facts (`TrainingFacts`, `Provenance`, measured `Result`s); nothing is invented here. A
`model-index` is written only when there are measured results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# Meta released the I-JEPA weights under CC BY-NC 4.0 (facebookresearch/ijepa LICENSE); anything derived keeps it.
META_WEIGHTS_LICENSE = "cc-by-nc-4.0"
# This project's code license (setup.py); a sensible default for weights trained from scratch with it.
PROJECT_LICENSE = "apache-2.0"

# Inside the package (shipped as package data, see setup.py), so cards work after a regular `pip install .` too.
TEMPLATE_DIR = Path(__file__).resolve().parent / "model_cards"
TEMPLATES = {"pretraining": "pretraining.md", "encoder": "encoder.md", "classifier": "classifier.md"}

BASE_TAGS = ["ijepa", "i-jepa", "self-supervised-learning", "vision-transformer", "vision"]

# Paper naming of the ViT sizes by (width, depth) (official `vit_tiny` ... `vit_giant`).
VIT_NAMES = {(192, 12): "ViT-Ti", (384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L", (1280, 32): "ViT-H",
             (1408, 40): "ViT-g"}

CITATION = """@inproceedings{assran2023self,
  title     = {Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture},
  author    = {Assran, Mahmoud and Duval, Quentin and Misra, Ishan and Bojanowski, Piotr and Vincent, Pascal and
               Rabbat, Michael and LeCun, Yann and Ballas, Nicolas},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""


@dataclass
class TrainingFacts:
    """What a run did. `dataset_id` goes to the `datasets` metadata (a Hub dataset id); the rest to the text."""

    dataset: str  # human-readable, e.g. "ImageNet-1k train (1.28M images)"
    dataset_id: str | None = None  # Hub id, e.g. "ILSVRC/imagenet-1k" or "zalando-datasets/fashion_mnist"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None  # global batch size
    recipe: str | None = None  # optimizer, schedules, masking, precision ... in one or two sentences
    final_loss: float | None = None
    hardware: str | None = None


@dataclass
class Provenance:
    """Where the weights come from."""

    source: str  # e.g. "Meta's official checkpoint IN1K-vit.h.14-300e.pth.tar" or "trained with scripts/pretrain.py"
    license: str = META_WEIGHTS_LICENSE
    base_model: str | None = None  # Hub id of the model these weights derive from, if it is on the Hub
    notes: list[str] = field(default_factory=list)  # e.g. conversion verification numbers


@dataclass
class Result:
    """One measured number for the model-index."""

    dataset_name: str  # e.g. "Fashion-MNIST"
    dataset_type: str  # Hub id, e.g. "zalando-datasets/fashion_mnist"
    metric_type: str  # e.g. "accuracy"
    value: float
    split: str = "test"
    task_type: str = "image-classification"
    metric_name: str | None = None  # e.g. "Top-1 accuracy (linear probe, frozen target encoder)"


def architecture_name(config) -> str:
    """E.g. "ViT-H/14 (224 px)"; other sizes give "ViT (width W, depth L)/P"."""
    size = (config.hidden_size, config.num_hidden_layers)
    name = VIT_NAMES.get(size, f"ViT (width {size[0]}, depth {size[1]})")
    image = config.image_size if isinstance(config.image_size, int) else "x".join(map(str, config.image_size))
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    return f"{name}/{patch} ({image} px)"


def architecture_rows(config, with_predictor: bool) -> list[tuple[str, str]]:
    grid = "x".join(str(side) for side in _grid(config))
    rows = [
        ("encoder", f"{architecture_name(config)}: width {config.hidden_size}, depth {config.num_hidden_layers}, "
                    f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, {grid} patches, "
                    "fixed 2-D sin-cos positions, no CLS token"),
    ]
    if with_predictor:
        rows.append(("predictor", f"width {config.pred_hidden_size}, depth {config.pred_num_hidden_layers}, "
                                  f"{config.pred_num_attention_heads} heads, MLP ratio {config.pred_mlp_ratio}"))
    return rows


def _grid(config) -> tuple[int, int]:
    image = (config.image_size,) * 2 if isinstance(config.image_size, int) else tuple(config.image_size)
    patch = (config.patch_size,) * 2 if isinstance(config.patch_size, int) else tuple(config.patch_size)
    return image[0] // patch[0], image[1] // patch[1]


def _card_data(
    *, provenance: Provenance, training: TrainingFacts | None, pipeline_tag: str, tags: list[str],
    model_name: str, results: list[Result] | None,
) -> ModelCardData:
    eval_results = [
        EvalResult(
            task_type=r.task_type, dataset_type=r.dataset_type, dataset_name=r.dataset_name, dataset_split=r.split,
            metric_type=r.metric_type, metric_value=r.value, metric_name=r.metric_name,
        )
        for r in results or []
    ]
    return ModelCardData(
        license=provenance.license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=BASE_TAGS + [t for t in tags if t not in BASE_TAGS],
        datasets=[training.dataset_id] if training and training.dataset_id else None,
        base_model=provenance.base_model,
        # `model_name` only names the model-index; without results it would be a stray metadata key.
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )


def _render(kind: str, data: ModelCardData, template_dir: Path | None, **facts) -> ModelCard:
    template = Path(template_dir or TEMPLATE_DIR) / TEMPLATES[kind]
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} is missing: reinstall the package (the templates ship as package data "
            "in modeling_ijepa/model_cards/) or pass template_dir= pointing at a folder holding "
            f"{sorted(TEMPLATES.values())}."
        )
    return ModelCard.from_template(data, template_path=str(template), citation=CITATION, **facts)


def pretraining_card(
    config, *, provenance: Provenance, training: TrainingFacts | None = None, repo_id: str | None = None,
    results: list[Result] | None = None, template_dir: Path | None = None,
) -> ModelCard:
    """Card for an `IJepaForPreTraining` directory (loads with `trust_remote_code=True`)."""
    model_name = repo_id or f"I-JEPA {architecture_name(config)} pretraining checkpoint"
    data = _card_data(provenance=provenance, training=training, pipeline_tag="image-feature-extraction",
                      tags=["custom_code", "pretraining"], model_name=model_name, results=results)
    return _render("pretraining", data, template_dir, model_name=model_name, repo_id=repo_id or "path/to/this/dir",
                   architecture=architecture_rows(config, with_predictor=True), provenance=provenance,
                   training=training, results=results or [])


def encoder_card(
    config, *, which: str, provenance: Provenance, training: TrainingFacts | None = None,
    repo_id: str | None = None, results: list[Result] | None = None, template_dir: Path | None = None,
) -> ModelCard:
    """Card for one encoder exported as a plain transformers `ijepa` checkpoint; `which` is "target" or "context"."""
    descriptions = {
        "target": "the EMA **target encoder** — the encoder the paper evaluates",
        "context": "the **context encoder** (the one transformers' `facebook/ijepa_vith14_1k` and timm's I-JEPA "
                   "weights were converted from); the paper evaluates the EMA target encoder",
    }
    if which not in descriptions:
        raise ValueError(f"which={which!r}: choose 'target' or 'context'.")
    model_name = repo_id or f"I-JEPA {architecture_name(config)} {which} encoder"
    data = _card_data(provenance=provenance, training=training, pipeline_tag="image-feature-extraction",
                      tags=["image-feature-extraction", f"{which}-encoder"], model_name=model_name, results=results)
    return _render("encoder", data, template_dir, model_name=model_name, repo_id=repo_id or "path/to/this/dir",
                   which=which, which_description=descriptions[which],
                   architecture=architecture_rows(config, with_predictor=False), provenance=provenance,
                   training=training, results=results or [])


def classifier_card(
    config, *, provenance: Provenance, training: TrainingFacts, results: list[Result] | None = None,
    repo_id: str | None = None, protocol: str = "fine-tuned", template_dir: Path | None = None,
) -> ModelCard:
    """Card for an `IJepaForImageClassification` directory. `protocol`: e.g. "linear probe (frozen encoder)"."""
    model_name = repo_id or f"I-JEPA {architecture_name(config)} image classifier"
    data = _card_data(provenance=provenance, training=training, pipeline_tag="image-classification",
                      tags=["image-classification"], model_name=model_name, results=results)
    labels = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    return _render("classifier", data, template_dir, model_name=model_name, repo_id=repo_id or "path/to/this/dir",
                   architecture=architecture_rows(config, with_predictor=False), provenance=provenance,
                   training=training, results=results or [], protocol=protocol, labels=labels)


def save_card(card: ModelCard, directory: str | Path) -> Path:
    """Write `README.md` into `directory` and check that it parses back (`ModelCard.load`) with the same metadata."""
    path = Path(directory) / "README.md"
    card.save(path)
    reloaded = ModelCard.load(path)
    if reloaded.data.to_dict() != card.data.to_dict():
        raise ValueError(f"{path} does not parse back to the metadata it was rendered with; fix the template.")
    return path


__all__ = [
    "CITATION",
    "META_WEIGHTS_LICENSE",
    "PROJECT_LICENSE",
    "Provenance",
    "Result",
    "TrainingFacts",
    "architecture_name",
    "classifier_card",
    "encoder_card",
    "pretraining_card",
    "save_card",
]
