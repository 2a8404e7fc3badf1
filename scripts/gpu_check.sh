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
#   GPU_CHECK_ONLY="stability loop" bash scripts/gpu_check.sh "$OUT"  # issue 20's groups (about 9 minutes)
#
# Each measurement is its own process under its own `timeout`; after each one a row is appended to
# RESULTS_DIR/gpu_check.md and its JSON to RESULTS_DIR/gpu_check.jsonl, so a timeout or crash loses only that row.
# Groups: the step rows (under 9 minutes of timeouts; most finish well within theirs), `stability` (issue 20: the
# same masks replayed, per-step instruments, one switch per process; at most STABILITY_BUDGET_S=300 s) and `loop`
# (issue 20: the real pretraining loop, eager and compiled, on a synthetic JPEG parquet; needs `datasets`). All of
# them together take longer than one 10-minute command: select groups with GPU_CHECK_ONLY.
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

selected() {  # name [group]: in GPU_CHECK_ONLY by name or by group (stability, loop), or no GPU_CHECK_ONLY at all
  [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]] || [[ -n "${2:-}" && " $GPU_CHECK_ONLY " == *" $2 "* ]]
}

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

# Step stability (issue 20): the same mask sets replayed twice in one process (per-step CUDA-event times, shapes, SDPA
# kernel choice, allocator counters, GC pauses, SM clock), then one switch per process on a shorter replay. The group
# stops starting variants once STABILITY_BUDGET_S would be exceeded (5 minutes on one GPU).
STABILITY_BUDGET_S=${STABILITY_BUDGET_S:-300}
stability_start=-1
stability() {  # name timeout allocator-settings benchmark-arguments...
  local name=$1 limit=$2 allocator=$3; shift 3
  selected "$name" stability || return 0
  [ "$stability_start" -ge 0 ] || stability_start=$SECONDS
  local json="$RESULTS/$name.json" start=$SECONDS rc=0
  if [ $((SECONDS - stability_start + limit)) -gt "$STABILITY_BUDGET_S" ]; then
    echo "$name: skipped (the stability group's ${STABILITY_BUDGET_S} s budget)" | tee -a "$RESULTS/gpu_check.md"
    return 0
  fi
  echo "== $name (timeout ${limit}s, PYTORCH_CUDA_ALLOC_CONF=${allocator:-unset})" | tee -a "$RESULTS/log.txt"
  env ${allocator:+PYTORCH_CUDA_ALLOC_CONF=$allocator} timeout --kill-after=10 "$limit" "$PYTHON" \
    "$REPO/scripts/benchmark.py" --sections stability --stability_label "$name" --output "$json" "$@" \
    >> "$RESULTS/log.txt" 2>&1 || rc=$?
  "$PYTHON" - "$name" "$rc" "$((SECONDS - start))" "$json" <<'PY' | tee -a "$RESULTS/gpu_check.md"
import json, os, sys
from modeling_ijepa.benchmarks.step_stability import format_stability_table
name, rc, seconds, path = sys.argv[1:5]
if not os.path.exists(path):
    print(f"{name}: rc={rc}, {seconds} s, no result (timeout or error, see log.txt)")
    sys.exit()
result = json.load(open(path))["results"][-1]
print(f"\n{name}: rc={rc}, {seconds} s; SDPA kernels seen by the profiler: {result['profiler_attention_kernels']}; "
      f"SM clock: {result['sm_clock']}; distinct shapes {result['distinct_shapes']}\n")
print(format_stability_table([result]))
PY
}
if [ "$CONFIGS" = "tiny-cpu" ]; then
  tiny=(--device cpu --stability_config tiny-cpu --stability_batch_size 8 --stability_dtype fp32)
  stability stability_default 120 "" "${tiny[@]}" --stability_masks 6 --stability_passes 2 --stability_compare_steps 3
  stability stability_flash_first 60 "" "${tiny[@]}" --stability_masks 3 --stability_passes 1 \
    --stability_sdpa_backends flash,efficient,cudnn,math
  stability stability_gc 60 "" "${tiny[@]}" --stability_masks 3 --stability_passes 1 --stability_gc_collect_steps 2
else
  vith=(--device cuda --stability_config vit-huge-14 --stability_batch_size 128 --stability_dtype bf16)
  stability stability_default 180 "" "${vith[@]}" --stability_masks 200 --stability_passes 2 --stability_compare_steps 40
  stability stability_flash_first 60 "" "${vith[@]}" --stability_masks 40 --stability_passes 1 \
    --stability_sdpa_backends flash,efficient,cudnn,math
  stability stability_expandable 60 "expandable_segments:True" "${vith[@]}" --stability_masks 40 --stability_passes 1
  stability stability_gc 60 "" "${vith[@]}" --stability_masks 40 --stability_passes 1 --stability_gc_collect_steps 20
fi

# The real loop (issue 20), eager and --torch_compile, timed by 10-step windows from step 0 (compile time apart), on a
# synthetic ImageNet-like JPEG parquet made here (needs `datasets`: scripts/gpu_wheels.txt). The dataset lives in a
# temporary folder, never under RESULTS (which travels back).
loop_run() {  # name timeout benchmark-arguments...
  local name=$1 limit=$2; shift 2
  local json="$RESULTS/$name.json" start=$SECONDS rc=0
  echo "== $name (timeout ${limit}s)" | tee -a "$RESULTS/log.txt"
  timeout --kill-after=10 "$limit" "$PYTHON" "$REPO/scripts/benchmark.py" --sections loop --loop_dataset "$LOOP_DATA" \
    --output "$json" "$@" >> "$RESULTS/log.txt" 2>&1 || rc=$?
  "$PYTHON" - "$name" "$rc" "$((SECONDS - start))" "$json" <<'PY' | tee -a "$RESULTS/gpu_check.md"
import json, os, sys
from modeling_ijepa.benchmarks.real_loop import format_loop_table
name, rc, seconds, path = sys.argv[1:5]
if not os.path.exists(path):
    print(f"{name}: rc={rc}, {seconds} s, no result (timeout or error, see log.txt)")
    sys.exit()
print(f"\n{name}: rc={rc}, {seconds} s\n")
print(format_loop_table(json.load(open(path))["results"][-1:]))
PY
}
if selected loop_eager loop || selected loop_compiled loop; then
  if [ "$CONFIGS" = "tiny-cpu" ]; then
    loop_batch=8 loop_steps=30
    loop_args=(--device cpu --loop_config tiny-cpu --loop_settings "--dataloader_num_workers 1")
  else  # the issue's setting: ViT-H/14, batch 128, bf16 autocast, automatic worker count
    loop_batch=128 loop_steps=150
    loop_args=(--loop_config vit-huge-14 --loop_settings "--mixed_precision bf16")
  fi
  loop_args+=(--loop_batch_size "$loop_batch" --loop_steps "$loop_steps")
  LOOP_DATA=$(mktemp -d)/jpegs
  start=$SECONDS
  loop_images=$((loop_batch * loop_steps * 11 / 10))  # 10% more than the run reads: no epoch boundary inside it
  if timeout 180 "$PYTHON" -m modeling_ijepa.benchmarks.real_loop "$LOOP_DATA" "$loop_images" \
      >> "$RESULTS/log.txt" 2>&1; then
    echo "loop dataset: $loop_images JPEGs in $((SECONDS - start)) s" | tee -a "$RESULTS/gpu_check.md"
    selected loop_eager loop && loop_run loop_eager 240 "${loop_args[@]}"
    selected loop_compiled loop && loop_run loop_compiled 300 "${loop_args[@]}" --loop_compile true
  else
    echo "loop dataset: failed (is \`datasets\` installed? see scripts/gpu_wheels.txt and log.txt)" | tee -a "$RESULTS/gpu_check.md"
  fi
  rm -rf "$(dirname "$LOOP_DATA")"
fi
echo "results in $RESULTS/gpu_check.md (log: $RESULTS/log.txt)"
