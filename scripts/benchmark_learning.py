#!/usr/bin/env python
"""Does pretraining learn? Pretrain a tiny I-JEPA on Fashion-MNIST for a fixed budget, then probe (a) the pretrained
EMA target encoder, (b) the same architecture at random init and (c) the raw pixels, and print one table.

    python scripts/benchmark_learning.py --output_dir runs/benchmark_learning
    python scripts/benchmark_learning.py --probes linear batchnorm attentive knn      # every probe, one extraction
    python scripts/benchmark_learning.py --run_name lr3e-3 --learning_rate 3e-3 --results_file screen.jsonl

The pretraining is the package's own loop (`modeling_ijepa.training.pretrain`, what `scripts/pretrain.py` runs), in
this process; the probes are `modeling_ijepa.probe_run`'s. Data: Debian's `dataset-fashion-mnist`, exported once
to parquet; nothing is downloaded. Default budget and recipe, and what each setting did: docs/evaluation.md. The work
is `modeling_ijepa.benchmarks.learning.run_benchmark`.
"""

from __future__ import annotations

import logging
import os
import sys

from modeling_ijepa.benchmarks.learning import BenchmarkArguments, run_benchmark, validate_benchmark_arguments
from modeling_ijepa.training.validation import ArgumentError, exit_for_bad_arguments, parse_command_line


def parse_args(argv: list[str]) -> BenchmarkArguments:
    """The benchmark arguments, checked: bad arguments raise `ArgumentError` before the export and the pretraining."""
    (args,) = parse_command_line((BenchmarkArguments,), argv)
    validate_benchmark_arguments(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ArgumentError as error:  # one line per bad argument, exit 2, no traceback
        exit_for_bad_arguments(error, os.path.basename(sys.argv[0]))
    summary = run_benchmark(args)
    print("\n" + summary["table"])
    first = summary["probes"][0]
    print(
        f"\nProbes: {first['num_train']} train / {first['num_test']} test images. Total wall time "
        f"{summary['total_wall_s'] / 60:.1f} min (pretraining {summary['pretraining']['wall_s'] / 60:.1f} min, "
        f"probes {summary['probe_wall_s'] / 60:.1f} min). Results in {os.path.join(args.output_dir, 'results.json')}."
    )
    return summary


if __name__ == "__main__":
    main()
