from pathlib import Path

from setuptools import find_packages, setup

TRAIN_REQUIRES = [
    "accelerate>=1.10,<2",
    "datasets>=3.0",
    "evaluate>=0.4",
    "torchvision",
    "tensorboard",
    "tqdm",
    "huggingface_hub>=1.0",
    "pyyaml",
]

setup(
    name="modeling-ijepa",
    version="0.1.0",
    description="I-JEPA for Hugging Face Transformers: pretraining, conversion, Hub checkpoints and fine-tuning.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["modeling_ijepa", "modeling_ijepa.*"]),
    # Runtime files that are not Python: the model card templates read by modeling_ijepa/cards.py.
    package_data={"modeling_ijepa": ["model_cards/*.md", "metrics/*/*.py"]},
    python_requires=">=3.10",
    # transformers 5.x: the weight names (`layers.N.attention.q_proj`) and conversion-mapping API we build on. 5.0.0
    # is too old (no `transformers.utils.output_capturing`, no `merge_with_config_defaults`, IJepaModel still in the
    # `encoder.layer.N` layout). 5.17 (the GPU machine's) is the floor: CI runs the model and masking tests on it in a
    # second venv (.ci/run); the training wing's tests run on the main venv's newer transformers.
    # huggingface_hub: modeling_ijepa/hub.py works with 1.0 (httpx) and 2.x (httpx2); transformers sets the real floor.
    install_requires=["torch>=2.4", "transformers>=5.17,<6", "safetensors"],
    extras_require={
        "train": TRAIN_REQUIRES,
        # scipy: two-sample tests of the mask distribution (tests/test_mask_distribution.py); ruff: .ci/run's lint;
        # scikit-image: the real photographs (`skimage.data`) the `decode` benchmark makes its JPEGs from.
        "dev": ["pytest>=7", "scipy", "ruff", "scikit-image"] + TRAIN_REQUIRES,
    },
    license="Apache-2.0",
)
