#!/usr/bin/env bash
# One-GPU performance check (issue 6): the benchmark's ViT-H/14 and ViT-L/16 pretraining steps in bf16 autocast with
# SDPA, against the official-style baseline, printing images/s, MFU and peak CUDA memory. Budget: under 5 minutes
# on an H100/H200-class GPU (most of it is initialising 1.3B + 0.6B parameters and the first cuDNN/cuBLAS calls).
#
#   bash scripts/gpu_check.sh                 # writes gpu_check.json next to the printed table
#   COMPILE=1 bash scripts/gpu_check.sh       # also measures torch.compile (adds a few minutes of compilation)
#
# Target (issue 6): ViT-H/14 bf16 step >= 400 images/s on an H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUTPUT=${OUTPUT:-gpu_check.json}
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False).")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
COMPILE_MODES=(off)
if [ "${COMPILE:-0}" = "1" ]; then COMPILE_MODES=(off on); fi
# Batch 64 for ViT-H/14 (the paper's per-GPU batch is 128 in fp16 on A100-80GB; 64 keeps both models, their AdamW
# states and the baseline's materialised attention within any 80 GB GPU), 128 for ViT-L/16.
timeout 290 "$PYTHON" scripts/benchmark.py --device cuda --configs vit-huge-14 --batch_size 64 --dtypes bf16 \
  --attn_implementations sdpa --compile "${COMPILE_MODES[@]}" --sections step --warmup 2 --reps 5 \
  --output "${OUTPUT%.json}_vith14.json"
timeout 200 "$PYTHON" scripts/benchmark.py --device cuda --configs vit-large-16 --batch_size 128 --dtypes bf16 \
  --attn_implementations sdpa --compile "${COMPILE_MODES[@]}" --sections step collator --warmup 2 --reps 5 \
  --output "${OUTPUT%.json}_vitl16.json"
"$PYTHON" - "${OUTPUT%.json}_vith14.json" "${OUTPUT%.json}_vitl16.json" <<'PY'
import json, sys
print("\nconfig | batch | compile | images/s (ours) | images/s (baseline) | ours/baseline time | MFU | peak step MiB ours/baseline | loss parity")
for path in sys.argv[1:]:
    for r in json.load(open(path))["results"]:
        if r["kind"] != "step" or r.get("skipped"):
            continue
        mem = f"{r['ours_memory']['peak_allocated_mib']:.0f}/{r['baseline_memory']['peak_allocated_mib']:.0f}" if "ours_memory" in r else "-"
        print(f"{r['config']} | {r['batch_size']} | {r['compile']} | {r['images_per_s']:.1f} | "
              f"{r['batch_size'] / r['baseline_s']:.1f} | {r['ratio']:.3f} | {r['mfu'] * 100:.1f}% | {mem} | "
              f"{'OK' if r['parity']['match'] else 'MISMATCH'} ({r['parity']['max_rel_diff']:.1e})")
PY
