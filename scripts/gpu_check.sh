#!/usr/bin/env bash
# One-GPU check, written to run as-is on a bare GPU machine (python3, torch, transformers >= 5.17, no `datasets`, only
# this working tree): our pretraining step (no baseline) at ViT-H/14 batch 128 and ViT-L/16 batch 128, bf16 autocast,
# SDPA, eager and regionally compiled; images/s, MFU against the matmul peak measured in the same run and against
# the datasheet peak, peak CUDA memory, and the mask sampler timed apart from the step (in training it runs in the
# loader's workers).
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     # default: $OUT, else ./gpu_check_results
#   GPU_CHECK_CONFIGS=tiny-cpu bash scripts/gpu_check.sh /tmp/x    # dry run on CPU in seconds (tests use it)
#   PYTHON=python3.12 DATASHEET_PEAK_TFLOPS=989 bash scripts/gpu_check.sh
#   GPU_CHECK_ONLY="vith14_eager collator" bash scripts/gpu_check.sh   # a subset of the measurements below
#
# Each measurement is its own process under its own `timeout`; after each one a row is appended to
# RESULTS_DIR/gpu_check.md and its JSON to RESULTS_DIR/gpu_check.jsonl, so a timeout or crash loses only that row.
# Total under 9 minutes of timeouts (most measurements finish well within theirs).
# Wheels for what the machine lacks (e.g. `datasets` for the data-pipeline row): see scripts/gpu_wheels.txt; put them
# in ./wheels and they are installed into a temporary folder first.
set -uo pipefail  # no -e: a failed measurement is recorded and the next one runs
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
RESULTS=${1:-${OUT:-gpu_check_results}}
CONFIGS=${GPU_CHECK_CONFIGS:-gpu}
# NVIDIA H200 SXM datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity). Override for other GPUs (H100 SXM: 989).
DATASHEET_PEAK_TFLOPS=${DATASHEET_PEAK_TFLOPS:-989}
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if compgen -G "$REPO/wheels/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --find-links "$REPO/wheels" --target "$SITE" "$REPO"/wheels/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

"$PYTHON" - "$RESULTS" <<'PY' | tee -a "$RESULTS/gpu_check.md"
import platform, sys, torch, transformers
line = f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    line += f", GPU {props.name} {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
print(f"\n## gpu_check {sys.argv[1]}\n\n{line}\n")
print("| measurement | rc | s | config | batch | compile | img/s | step ms | sampler ms (ours) | MFU measured peak | "
      "MFU datasheet | matmul peak TFLOP/s | peak MiB |")
print("|" + "---|" * 13)
PY

summarize() {  # name rc seconds json: append one row (and the JSON) even when the measurement failed
  "$PYTHON" - "$@" "$DATASHEET_PEAK_TFLOPS" "$RESULTS" <<'PY'
import json, os, sys
name, rc, seconds, path, datasheet, results = sys.argv[1:7]
rows = []
if os.path.exists(path):
    data = json.load(open(path))
    with open(os.path.join(results, "gpu_check.jsonl"), "a") as f:
        f.write(json.dumps({"measurement": name, **data}) + "\n")
    rows = [r for r in data["results"] if r.get("kind") == "step" and not r.get("skipped")]
out = open(os.path.join(results, "gpu_check.md"), "a")
if not rows:
    print(f"| {name} | {rc} | {seconds} | no result (timeout or error, see log.txt) |" + " |" * 9, file=out)
def number(value, scale=1.0, digits=1, suffix=""):
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"
for r in rows:
    memory = r.get("ours_memory", {})
    memory = memory.get("peak_allocated_mib", memory.get("peak_rss_mib"))
    achieved = r.get("achieved_flops")
    cells = [name, rc, seconds, r["config"], r["batch_size"], r["compile"], number(r["images_per_s"]),
             number(r["ours_s"], 1e3), number(r.get("ours_sampler_s"), 1e3), number(r.get("mfu"), 100, 1, "%"),
             number(achieved and achieved / (float(datasheet) * 1e12), 100, 1, "%"),
             number(r.get("matmul_peak_flops"), 1e-12, 3), number(memory, digits=0)]
    print("| " + " | ".join(str(cell) for cell in cells) + " |", file=out)
out.close()
PY
}

selected() { [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

measure() {  # name timeout_s benchmark-arguments...
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  local json="$RESULTS/$name.json" start=$SECONDS
  echo "== $name (timeout ${limit}s)" | tee -a "$RESULTS/log.txt"
  timeout --kill-after=10 "$limit" "$PYTHON" "$REPO/scripts/benchmark.py" --sections step --baseline false \
    --output "$json" "$@" >> "$RESULTS/log.txt" 2>&1
  local rc=$?
  summarize "$name" "$rc" "$((SECONDS - start))" "$json"
  tail -n 1 "$RESULTS/gpu_check.md"
}

if [ "$CONFIGS" = "tiny-cpu" ]; then
  # The same measurements on CPU at the tiny config; the compiled path through aot_eager (no C++ toolchain needed).
  common=(--device cpu --configs tiny-cpu --batch_size 8 --dtypes fp32 --warmup 1 --reps 2 --memory false
          --compile_backend aot_eager)
  measure tiny_eager 120 "${common[@]}" --compile off
  measure tiny_compiled 180 "${common[@]}" --compile on
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False); GPU_CHECK_CONFIGS=tiny-cpu runs on CPU." >&2
    exit 1
  fi
  common=(--device cuda --batch_size 128 --dtypes bf16 --attn_implementations sdpa --warmup 2 --reps 5)
  # Eager first: a row per model before any compile time is spent.
  measure vith14_eager 120 "${common[@]}" --configs vit-huge-14 --compile off
  measure vitl16_eager 80 "${common[@]}" --configs vit-large-16 --compile off
  measure vith14_compiled 170 "${common[@]}" --configs vit-huge-14 --compile on
  measure vitl16_compiled 120 "${common[@]}" --configs vit-large-16 --compile on
fi
# The mask sampler alone (CPU; the official loop sampler next to ours) at the ViT-H/14 grid, batch 128.
collator=(--collator_preset vit-huge-14 --collator_batch_size 128 --collator_reps 5)
[ "$CONFIGS" = "tiny-cpu" ] && collator=(--collator_preset tiny-cpu --collator_batch_size 8 --collator_reps 2)
sampler() {
  selected collator || return 0
  local start=$SECONDS rc summary
  timeout 60 "$PYTHON" "$REPO/scripts/benchmark.py" --sections collator "${collator[@]}" \
    --output "$RESULTS/collator.json" >> "$RESULTS/log.txt" 2>&1
  rc=$?
  summary=$("$PYTHON" - "$RESULTS/collator.json" 2>/dev/null <<'PY' || echo "no result (see log.txt)"
import json, sys
r = json.load(open(sys.argv[1]))["results"][-1]
print(f"ours {r['ours_s'] * 1e3:.2f} ms, official loop {r['loop_reference_s'] * 1e3:.2f} ms per batch of {r['batch_size']}")
PY
)
  echo "mask sampler (apart from the step) rc=$rc, $((SECONDS - start)) s: $summary" | tee -a "$RESULTS/gpu_check.md"
}
sampler
echo "results in $RESULTS/gpu_check.md (log: $RESULTS/log.txt)"
