#!/usr/bin/env python
"""Export Debian's Fashion-MNIST (IDX gzip files) as parquet shards that `datasets.load_dataset` reads.

    python scripts/fashion_mnist.py --output_dir data/fashion_mnist --split train --split test

The export itself is `modeling_ijepa.training.fashion_mnist.export_fashion_mnist` (layout and guarantees there).
"""

from __future__ import annotations

import argparse

from modeling_ijepa.training.fashion_mnist import DEFAULT_SOURCE_DIR, IDX_FILES, export_fashion_mnist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Root folder for the parquet shards.")
    parser.add_argument(
        "--split", action="append", choices=sorted(IDX_FILES), help="Split(s) to export (repeatable; default: train)."
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Keep only the first N images of each split.")
    parser.add_argument("--num_shards", type=int, default=None, help="Parquet files per split (default 4 train, 1 test).")
    parser.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR, help="Folder with the IDX .gz files.")
    args = parser.parse_args(argv)
    for split in args.split or ["train"]:
        path = export_fashion_mnist(
            args.output_dir, split=split, max_samples=args.max_samples, num_shards=args.num_shards,
            source_dir=args.source_dir,
        )
        print(f"{split}: load with datasets.load_dataset({path!r}, split={split!r})")


if __name__ == "__main__":
    main()
