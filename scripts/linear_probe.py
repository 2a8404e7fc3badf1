#!/usr/bin/env python
"""Frozen evaluation of an I-JEPA encoder on any `datasets` image-classification dataset.

Assran et al. (CVPR 2023), Sec. 5 / Appendix C: the target encoder is frozen, its average-pooled patch features are
extracted once, and a linear classifier is trained on them. The official repository never released this code; the
protocols (`--probe linear|batchnorm|attentive|knn`) are documented in `modeling_ijepa/probe_run.py`,
`modeling_ijepa/probes.py` and `docs/evaluation.md`.

    python scripts/linear_probe.py --model_name_or_path runs/pretrain --dataset_name data/fashion_mnist \
        --max_train_samples 10000 --num_layers 1 --output_file runs/pretrain/linear_probe.json
    python scripts/linear_probe.py ... --probe batchnorm --num_layers 4      # the paper's low-level protocol
    python scripts/linear_probe.py ... --probe attentive                     # V-JEPA's attentive probe
    python scripts/linear_probe.py --raw_pixels --image_size 28 --dataset_name data/fashion_mnist  # pixel baseline

`--model_name_or_path` is a pretraining directory (its EMA target encoder `ijepa.*` is probed), an encoder or a
transformers `ijepa` checkpoint. `--streaming` reads the dataset without materialising it. The result is printed and
written as JSON. Exit codes: 0 done, 2 bad arguments (one `linear_probe.py: error: ...` line each, checked by
`probe_run.validate_probe_arguments` before any data is read or any model loaded).
"""

from __future__ import annotations

import logging
import os
import sys

from modeling_ijepa.probe_run import ProbeArguments, run_probe, validate_probe_arguments
from modeling_ijepa.training.validation import ArgumentError, exit_for_bad_arguments, parse_command_line


def parse_args(argv: list[str]) -> ProbeArguments:
    """The probe arguments, checked: bad arguments raise `ArgumentError` before any data or model."""
    (args,) = parse_command_line((ProbeArguments,), argv)
    validate_probe_arguments(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as error:  # one line per bad argument, exit 2, no traceback
        exit_for_bad_arguments(error, os.path.basename(sys.argv[0]))
    output = run_probe(args)
    print(
        f"{args.probe} probe of {output['model']} on {args.dataset_name}: top-1 {100 * output['test_accuracy']:.2f}% "
        f"({output['num_test']} {args.test_split} images, {output['num_train']} {args.train_split} images, "
        f"{output['feature_dim']}-d features)" + (f"; written to {args.output_file}" if args.output_file else "")
    )
    return output


if __name__ == "__main__":
    main()
