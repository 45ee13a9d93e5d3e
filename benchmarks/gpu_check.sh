#!/usr/bin/env bash
# The prepared device run (#38): one call of the `device` tool (a command there may run 600 s, and the
# machine's start comes out of the same ~15 minutes), most important measurement first, each stage
# with its own limit (they add up to at most 540 s), each writing its JSON as it goes so a cut-off
# run keeps what it measured. Data and run directories live under /tmp; $OUT gets two files (what
# comes back from the machine is at most 8 files, 16 MiB each, two folders deep):
#   $OUT/summary.json   every stage's status, seconds and results
#   $OUT/log.txt        everything the stages printed
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, in the checkout, with .whl carried
#   bash benchmarks/gpu_check.sh --dry-run   # here, on the CPU: every stage at toy sizes, the same rules
#
# Before the device call, here: bash ../shared/gpu/prepare-wheels.sh (hydra-core, omegaconf, antlr4 as
# wheels in .whl/, which the GPU machine lacks); name .whl in the call's carry.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
LOG="$OUT/log.txt"
STAGES="$WORK/stages.jsonl"
: > "$LOG"
: > "$STAGES"
BUDGET_S=540

# name:limit of every stage, in the order they run; the sum is checked before anything runs
LIMITS=(env:15 correctness:90 selftest:30 step_eager:60 step_compiled:175 loader:45 e2e:75 host_syncs:25 memory:25)
ROOFLINE_LIMIT=120  # in the background beside the others (CPU only): not part of the sequential budget
total=0
for entry in "${LIMITS[@]}"; do total=$((total + ${entry#*:})); done
if [ "$total" -gt "$BUDGET_S" ]; then
  echo "gpu_check: the stages' limits add up to ${total} s, over the ${BUDGET_S} s budget" | tee -a "$LOG" >&2
  exit 2
fi
limit() { for entry in "${LIMITS[@]}"; do [ "${entry%%:*}" = "$1" ] && echo "${entry#*:}"; done; }

# The carried wheels (the GPU machine has torch, torchvision, timm, triton, pytest; not hydra/omegaconf)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    || { echo "gpu_check: installing the carried wheels failed (see $LOG)" >&2; exit 2; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the kernels in the interpreter, nothing on a GPU
  DEV=cpu; DTYPE=fp32; PREC=fp32
else
  export TRITON_INTERPRET=0
  DEV=cuda; DTYPE=bf16; PREC=bf16
fi

stage() {  # stage NAME COMMAND...: run under the stage's limit, log it, record status and seconds
  local name="$1"; shift
  local lim start rc
  lim="$(limit "$name")"
  start=$(date +%s.%N)
  echo "=== $name (limit ${lim} s): $*" >> "$LOG"
  timeout --kill-after=5 "$lim" "$@" >> "$LOG" 2>&1
  rc=$?
  local secs
  secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  local status=ok
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status=timeout
  [ "$rc" != 0 ] && [ "$status" = ok ] && status=failed
  echo "{\"stage\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"limit_s\": $lim}" >> "$STAGES"
  echo "--- $name: $status in ${secs} s (rc $rc)" | tee -a "$LOG"
}

# 5 (started first): the roofline's prediction of the step below (fake tensors on the CPU, no GPU), in the
# background beside the GPU stages; its summary sits beside the profile of the compiled steps
if [ "$DRY" = 1 ]; then ROOF=(--model atto --batch 2 --img 64); else ROOF=(--model base --batch 128); fi
( start=$(date +%s); timeout --kill-after=5 "$ROOFLINE_LIMIT" nice -n 10 python3 benchmarks/step_roofline.py "${ROOF[@]}" \
    --gpu h200 --json "$WORK/roofline.json" > "$WORK/roofline.log" 2>&1; echo $? > "$WORK/roofline.rc"
  echo $(( $(date +%s) - start )) > "$WORK/roofline.secs" ) &
ROOF_PID=$!

# 0. what ran where
stage env python3 -c "
import json, platform, torch, triton
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'python': platform.python_version(),
                  'gpu': gpu, 'dry_run': $DRY}))"
# 1. correctness on the device: the tile kernel against the canvas (every stage, both grads, the self-test
#    and its failure injection) and the device decoder against the CPU path (the corrupt JPEG included)
if [ "$DRY" = 1 ]; then
  stage correctness python3 -m pytest -q -p no:cacheprovider tests/sparse/test_triton_dwconv.py -k "picks_the_tile_kernel"
else
  stage correctness python3 -m pytest -q -p no:cacheprovider --full -rf tests/sparse/test_triton_dwconv.py tests/data/test_gpu_decode.py
fi
# 2. the start-up self-test as the app runs it for base (and what it picks), timed: well under 2 s wanted
stage selftest python3 - "$DEV" "$DTYPE" "$DRY" "$WORK/selftest.json" <<'EOF'
import json, sys, time
import torch
from fcmae.models.variants import get_variant
from fcmae.sparse.dwconv_choice import resolve_dwconv, tiles_self_test_error
device, dtype, dry, out = torch.device(sys.argv[1]), {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2]], sys.argv[3] == "1", sys.argv[4]
dims = tuple(get_variant("convnextv2_base").dims)
start = time.perf_counter()
if dry:  # the interpreter: toy widths, one visible patch
    error = tiles_self_test_error(device, dtype, (16, 24, 32, 48), grid=(1, 2), mask_ratio=0.5, images=1)
    kernel, why = ("tiles" if error is None else "canvas"), error or "passed"
else:
    kernel, why = resolve_dwconv("auto", device, dtype, dims=dims)
first = time.perf_counter() - start
result = {"kernel": kernel, "why": why, "seconds_first": round(first, 3)}
if not dry:  # again, compiled kernels cached: the cost of the test itself
    start = time.perf_counter()
    resolve_dwconv("auto", device, dtype, dims=dims)
    result["seconds_cached"] = round(time.perf_counter() - start, 3)
json.dump(result, open(out, "w"))
if not dry and kernel == "tiles":  # what encoder.dwconv=auto then picks, stage by stage, at base's b128 shapes
    from fcmae.sparse.dwconv_choice import auto_by_speed, cuda_timer
    start = time.perf_counter()
    key = {"device": torch.cuda.get_device_name(device), "dtype": "bf16", "dims": list(dims), "batch": 128,
           "img_size": 224, "mask_ratio": 0.6}
    choice, how = auto_by_speed(None, key, cuda_timer(device, dtype, dims, 128, 224, 0.6), len(dims))
    result["by_speed"] = {"choice": choice, "how": how, "seconds": round(time.perf_counter() - start, 2)}
print(json.dumps(result))
json.dump(result, open(out, "w"))
sys.exit(0 if kernel == "tiles" else 1)
EOF
# 3. the step for base, bf16, batch 128: tile kernel vs canvas (eager: the kernels themselves), then
#    FCMAE-B against MAE ViT-B/16 compiled (goal: FCMAE-B at least as fast per image)
if [ "$DRY" = 1 ]; then  # aot_eager: the compiled path traced as for inductor, no C++ generated on 2 cores
  SIZE=(--models atto --batch-sizes 2 --img-sizes 64 --dtypes fp32 --device cpu --warmup 1 --repeats 1)
  BACKEND=aot_eager
else
  SIZE=(--models base --batch-sizes 128 --dtypes bf16 --device cuda --warmup 3 --repeats 5 --peak-tflops 989)
  BACKEND=inductor
fi
stage step_eager python3 benchmarks/step_time.py "${SIZE[@]}" --variants sparse sparse-canvas --json "$WORK/step_eager.json"
#    ... and the compiled steps split: torch.profiler over 3 steps of each after the timing (the compile is
#    done by then), kernels per step grouped by the roofline's op classes, with launch counts
stage step_compiled python3 benchmarks/step_time.py "${SIZE[@]}" --variants sparse mae --compile --only-compiled \
  --compile-backend "$BACKEND" --profile 3 --json "$WORK/step_compiled.json"
# 4. the loader alone (CPU workers vs device decode), then end to end vs the step alone (tiny)
if [ "$DRY" = 1 ]; then
  stage loader python3 benchmarks/loader_rate.py --make-jpegs 96 --cache "$WORK/jpegs" --workers 0 --decode cpu \
    --batch 8 --img-size 64 --batches 2 --device cpu --json "$WORK/loader.json"
  stage e2e python3 benchmarks/pretrain_rate.py --root "$WORK/jpegs" --out "$WORK/runs" --model atto --batch 4 \
    --img-size 64 --workers 0 --decode cpu --device cpu --warmup-steps 2 --window 3 --json "$WORK/e2e.json"
  stage host_syncs python3 benchmarks/host_syncs.py --model atto --batch 2 --img-size 64 --steps 4 --log-every 2 \
    --warmup 1 --precision fp32 --json "$WORK/host_syncs.json"
  stage memory python3 benchmarks/memory_plan.py measure --models atto --batches 2 --img 64 --checkpointing off \
    --json "$WORK/memory.json"
else
  stage loader python3 benchmarks/loader_rate.py --make-jpegs 2000 --cache "$WORK/jpegs" --workers 8,15 \
    --decode cpu,gpu --batch 128 --batches 10 --device cuda:0 --json "$WORK/loader.json"
  stage e2e python3 benchmarks/pretrain_rate.py --root "$WORK/jpegs" --out "$WORK/runs" --model tiny --batch 128 \
    --workers 8 --decode cpu,gpu --device cuda:0 --step-only --json "$WORK/e2e.json"
  stage host_syncs python3 benchmarks/host_syncs.py --model tiny --batch 64 --steps 24 --log-every 8 \
    --json "$WORK/host_syncs.json"
  # 6. the memory plan against the allocator's peak (#50 item 4): tiny b64 and base b32, off and block
  stage memory python3 benchmarks/memory_plan.py gpu --json "$WORK/memory.json"
fi
# 5. the roofline's prediction, started first (below) in the background: collected here
wait "$ROOF_PID"
roof_rc=$(cat "$WORK/roofline.rc" 2>/dev/null || echo 1)
{ echo "=== roofline (background, limit ${ROOFLINE_LIMIT} s)"; cat "$WORK/roofline.log"; } >> "$LOG"
roof_status=ok
[ "$roof_rc" = 124 ] || [ "$roof_rc" = 137 ] && roof_status=timeout
[ "$roof_rc" != 0 ] && [ "$roof_status" = ok ] && roof_status=failed
echo "{\"stage\": \"roofline\", \"status\": \"$roof_status\", \"rc\": $roof_rc, \"seconds\": $(cat "$WORK/roofline.secs" 2>/dev/null || echo 0), \"limit_s\": $ROOFLINE_LIMIT, \"background\": true}" >> "$STAGES"
echo "--- roofline: $roof_status (background, rc $roof_rc)" | tee -a "$LOG"

# The summary: every stage with its results, then the rules on $OUT that the device tool enforces
python3 - "$WORK" "$OUT" "$BUDGET_S" "$DRY" <<'EOF'
import json, os, sys
from pathlib import Path
work, out, budget, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
stages = [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines()]
for s in stages:
    f = work / f"{s['stage']}.json"
    if f.is_file():
        try:
            s["results"] = json.loads(f.read_text())
        except ValueError as exc:
            s["results_error"] = str(exc)
summary = {"dry_run": dry, "budget_s": budget, "limits_s": sum(s["limit_s"] for s in stages if not s.get("background")),
           "stages": stages}
# the measured split beside the modelled one: per op class, profiled ms a step (compiled) and the roofline's
# fused-rule floor
by = {s["stage"]: s.get("results") for s in stages}
split = {}
for r in ((by.get("step_compiled") or {}).get("results") or []):
    name = "fcmae" if r["variant"].startswith("sparse") else "mae"
    if r.get("profile"):
        split[name] = {"profiled_ms": r["profile"]["by_class"], "profiled_total_ms": r["profile"]["total_ms"],
                       "step_ms": r.get("step_ms")}
for name in ("fcmae", "mae"):
    model = (by.get("roofline") or {}).get(name)
    if model:
        split.setdefault(name, {})["roofline_fused"] = {c: round(v["ms"], 3) for c, v in model["b"]["classes"].items()}
        split[name]["roofline_fused_total_ms"] = model["b"]["total"]["ms"]
summary["step_split"] = split
(out / "summary.json").write_text(json.dumps(summary, indent=1))
files = [p for p in out.rglob("*") if p.is_file()]
problems = []
if len(files) > 8:
    problems.append(f"{len(files)} files in OUT (at most 8 come back)")
problems += [f"{p} is over 16 MiB" for p in files if p.stat().st_size > 16 * 2**20]
problems += [f"{p} is more than two folders down" for p in files if len(p.relative_to(out).parts) > 3]
if summary["limits_s"] > budget:
    problems.append(f"limits add up to {summary['limits_s']} s, over {budget} s")
failed = [s["stage"] for s in stages if s["status"] != "ok"]
print(f"gpu_check: {len(stages) - len(failed)}/{len(stages)} stages ok" + (f"; not ok: {', '.join(failed)}" if failed else "")
      + f"; {len(files)} files in {out}; limits {summary['limits_s']} s of {budget}")
for p in problems:
    print(f"gpu_check: RULE BROKEN: {p}")
sys.exit(1 if failed or problems else 0)
EOF
rc=$?
rm -rf "$WORK"
exit $rc
