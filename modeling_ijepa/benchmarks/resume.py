"""The `resume` benchmark: start-up time of a resume at the start of an epoch against one near its end.

One run of `modeling_ijepa.training.pretrain` on Fashion-MNIST exported as parquet shards (streaming, default
settings) saves a checkpoint after its first step, another run of the same schedule one near the end of the epoch; then each
is resumed, in this process, and each resume is timed from the `pretrain()` call (imports done) to the
return of its first optimizer step (the resume is then stopped). Everything a resume does before stepping is inside:
accelerator, model and dataset set-up, the checkpoint load and verification, the DataLoader worker start and the
data skip to the saved position (a stream resume starts at its group of shards, so it re-reads at most one group,
undecoded).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


class FirstStepReached(Exception):
    """Raised after a chosen optimizer step to end that run (its seconds so far in `args[0]`)."""


def run_pretrain(argv: list[str], stop_at_step: int | None = None) -> float:
    """Seconds from the `pretrain()` call to the return of its `stop_at_step`-th step of this process (the run is then
    stopped), or to its end."""
    from ..training import loop, parse_arguments, pretrain

    started, real_step, calls = time.perf_counter(), loop.train_step, []

    def counted_step(*args, **kwargs):
        outcome = real_step(*args, **kwargs)
        calls.append(None)
        if len(calls) == stop_at_step:
            raise FirstStepReached(time.perf_counter() - started)
        return outcome

    loop.train_step = counted_step
    try:
        pretrain(*parse_arguments(argv))
    except FirstStepReached as reached:
        return reached.args[0]
    finally:
        loop.train_step = real_step
    return time.perf_counter() - started


def resume_benchmark(split: str = "test", num_records: int = 2048, num_shards: int = 8, batch_size: int = 64,
                     end_fraction: float = 0.9, config_name: str = "tiny-cpu") -> dict:
    """`{"start_resume_s", "end_resume_s", "ratio", ...}`. Two runs of the same schedule make the checkpoints: one
    saves after step 1 (stopped at step 2), one trains to `end_fraction` of the epoch and saves there."""
    from ..training.fashion_mnist import export_fashion_mnist

    with tempfile.TemporaryDirectory() as tmp:
        data = export_fashion_mnist(Path(tmp) / "data", split=split, max_samples=num_records, num_shards=num_shards)
        records = min(num_records, {"train": 60_000, "test": 10_000}[split])
        steps = max(2, int(end_fraction * records / batch_size))

        def argv(output: str, *extra: str) -> list[str]:
            return ["--dataset_name", data, "--streaming", "true", "--train_split", split, "--config_name",
                    config_name, "--report_to", "none", "--per_device_train_batch_size", str(batch_size),
                    "--max_steps", str(steps + 1), "--output_dir", str(Path(tmp) / output), *extra]

        run_pretrain(argv("start", "--checkpointing_steps", "1"), stop_at_step=2)
        train_s = run_pretrain(argv("end", "--checkpointing_steps", str(steps)))
        timings = {name: run_pretrain(argv(name, "--resume_from_checkpoint", f"{tmp}/{name}/checkpoint-{step}"),
                                      stop_at_step=1) for name, step in (("start", 1), ("end", steps))}
    return {"kind": "resume", "config": config_name, "split": split, "num_shards": num_shards,
            "batch_size": batch_size, "records_per_shard": records // num_shards, "start_step": 1,
            "end_step": steps, "end_position": steps * batch_size, "epoch_records": records, "train_s": train_s,
            "start_resume_s": timings["start"], "end_resume_s": timings["end"],
            "ratio": timings["end"] / timings["start"]}


def format_resume_table(result: dict) -> str:
    lines = ["| resume from | data position (records of the epoch) | start-up to first step (s) | / start |",
             "|---|---|---|---|",
             f"| checkpoint-{result['start_step']} (start of the epoch) | {result['batch_size']} of "
             f"{result['epoch_records']} | {result['start_resume_s']:.2f} | 1.00 |",
             f"| checkpoint-{result['end_step']} (near its end) | {result['end_position']} of "
             f"{result['epoch_records']} | {result['end_resume_s']:.2f} | {result['ratio']:.2f} |"]
    return "\n".join(lines)
