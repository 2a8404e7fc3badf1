#!/usr/bin/env python
"""I-JEPA pretraining with Accelerate: the recipe of Assran et al. (CVPR 2023) on any `datasets` image dataset.

    # one process (CPU or one GPU)
    accelerate launch scripts/pretrain.py scripts/configs/tiny_fashion_mnist.yaml
    # 8 GPUs on one machine
    accelerate launch --multi_gpu --num_processes 8 scripts/pretrain.py scripts/configs/in1k_vith14_ep300.yaml
    # 2 CPU processes (real DDP over gloo)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py ...

Arguments come from the command line, from a YAML/JSON file given as the first argument, or both (the command line
wins); `--help` lists them. The loop itself is `modeling_ijepa.training.pretrain` (docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from modeling_ijepa.training import TrainingStopped, parse_arguments, pretrain


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, run_args = parse_arguments(argv)
    try:
        results = pretrain(model_args, data_args, run_args)
    except TrainingStopped as stopped:
        raise SystemExit(str(stopped)) from None
    output_dir = Path(results["output_dir"]).resolve()
    if results["is_main_process"]:
        print(
            f"\nPretraining done: {results['global_step']} steps, final loss {results['final_loss']:.4f}.\n"
            f"The model is in {output_dir} (resumable checkpoint: {Path(results['checkpoint']).resolve()}).\n"
            "Load the target encoder (the one the paper evaluates) with:\n"
            "    from transformers import AutoModel\n"
            f"    model = AutoModel.from_pretrained({str(output_dir)!r})\n"
        )
    return results


if __name__ == "__main__":
    main()
