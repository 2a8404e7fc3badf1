#!/usr/bin/env python
"""Convert Meta's official I-JEPA checkpoints (facebookresearch/ijepa `.pth.tar`) to Hub-ready directories, and back.

Official -> ours (architecture inferred from the tensors; strict load; verified against a reference forward pass
on the official tensors and against a reload of what was written):

    python scripts/convert_ijepa_checkpoint.py --checkpoint IN1K-vit.h.14-300e.pth.tar --output_dir ijepa-vith14-in1k \
        [--export_encoder ijepa-vith14-in1k-target --which target] [--push_to_hub --hub_repo_id me/ijepa-vith14]

Ours -> official (`--to_official`; the same key map in reverse):

    python scripts/convert_ijepa_checkpoint.py --to_official --checkpoint ijepa-vith14-in1k --output_file back.pth.tar

An encoder alone, from one of our pretraining directories (e.g. written by scripts/pretrain.py):

    python scripts/convert_ijepa_checkpoint.py --checkpoint runs/pretrain --export_encoder runs/encoder --which context

The key maps and the verification live in `modeling_ijepa/convert_official.py`, the run in
`modeling_ijepa/conversion.py`; this script parses the arguments and calls `run_conversion`.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from modeling_ijepa.conversion import ConversionArguments, run_conversion


def parse_args(argv: list[str] | None) -> ConversionArguments:
    parser = HfArgumentParser(ConversionArguments)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        path = sys.argv[1]
        (args,) = parser.parse_yaml_file(path) if path.endswith(("yaml", "yml")) else parser.parse_json_file(path)
        return args
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    return run_conversion(parse_args(argv))


if __name__ == "__main__":
    main()
