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

Exit codes: 0 done, 1 failed (a one-line reason: also a dead DataLoader worker or a lost process), 2 bad arguments
(checked before anything is built), 75 preempted by SIGTERM, Ctrl-C or --save_on_signal after saving a checkpoint
(resume with --resume_from_checkpoint latest), 130 a second Ctrl-C (no save; the previous checkpoint is intact).
Every process that stops with 1 or 75 prints `pretrain.py: process R exits with code C (...)` (a launcher killed by
the same signal does not report its ranks' codes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modeling_ijepa.training import TrainingStopped, parse_arguments, pretrain
from modeling_ijepa.training.checkpoints import CheckpointCorruptError, CheckpointSpaceError
from modeling_ijepa.training.data import DataWorkerError
from modeling_ijepa.training.preemption import ABANDONED_EXIT_CODE, Preempted
from modeling_ijepa.training.workers import LostProcessError, follow_launcher
from modeling_ijepa.training.validation import ArgumentError, validate_arguments

ARGUMENT_ERROR_EXIT_CODE = 2  # argparse's


def is_main_launch_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by the launcher; absent in a single-process run


def exit_process(code: int, reason: str) -> None:
    """One line per process with its exit code (under a launcher each rank's own code is otherwise not shown)."""
    print(f"{Path(sys.argv[0]).name}: process {os.environ.get('RANK', '0')} exits with code {code} ({reason})",
          file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, run_args = parse_arguments(argv)
    follow_launcher()  # a rank started by a launcher gets SIGTERM (the graceful path) if the launcher dies
    try:
        validate_arguments(model_args, data_args, run_args)  # before the Accelerator, the data and the model
        results = pretrain(model_args, data_args, run_args)
    except ArgumentError as error:
        if is_main_launch_process():
            prog = Path(sys.argv[0]).name
            print("\n".join(f"{prog}: error: {line}" for line in error.problems), file=sys.stderr)
        raise SystemExit(ARGUMENT_ERROR_EXIT_CODE) from None
    except Preempted as preempted:
        if is_main_launch_process():
            print(str(preempted), file=sys.stderr)
        exit_process(preempted.exit_code, "preempted, checkpoint saved")
    except (TrainingStopped, CheckpointCorruptError, CheckpointSpaceError) as stopped:
        raise SystemExit(str(stopped)) from None
    except KeyboardInterrupt:  # a second Ctrl-C in a single-process run (several processes exit in the handler)
        exit_process(ABANDONED_EXIT_CODE, "interrupted twice, nothing saved")
    except (DataWorkerError, LostProcessError) as failed:
        print(f"{type(failed).__name__}: {failed}", file=sys.stderr)
        exit_process(1, type(failed).__name__)
    if results["is_main_process"]:
        print(closing_message(results))
    return results


def closing_message(results: dict) -> str:
    """What the run did, whether its features beat random init (with --monitor_label_column), where the model is."""
    output_dir = Path(results["output_dir"]).resolve()
    lines = [f"\nPretraining done: {results['global_step']} steps, final loss {results['final_loss']:.4f}."]
    if "knn_accuracy" in results:
        gap = 100 * (results["knn_accuracy"] - results["knn_accuracy_random_init"])
        lines.append(
            f"k-NN accuracy of the target encoder: {100 * results['knn_accuracy']:.1f}% pretrained vs "
            f"{100 * results['knn_accuracy_random_init']:.1f}% for the same architecture at random init "
            f"({gap:+.1f} points; the margin over random init is what shows learning)."
        )
    lines += [
        f"The model is in {output_dir} (resumable checkpoint: {Path(results['checkpoint']).resolve()}).",
        "Load the target encoder (the one the paper evaluates) with:",
        "    from transformers import AutoModel",
        f"    model = AutoModel.from_pretrained({str(output_dir)!r})\n",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
