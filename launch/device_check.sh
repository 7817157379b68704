#!/usr/bin/env bash
# The prepared accelerator check: one command for a lent GPU (an H200, or any CUDA machine),
# ending by its own deadline; every section is bounded and a failed one does not stop the rest.
#   bash launch/device_check.sh [--smoke] [--sections=env,ceiling,attention,tuned,ncu,profile,train,grid,small] OUTDIR
# Sections, run in the order --sections names them (default: the order below): env
# (versions, devices, imports), ceiling (bf16/f32 matmul, memory copy),
# attention (each kernel fwd+bwd at the paper shape, error vs XLA f32; pallas_docs also at
# other launches: tiles, warps, stages, heads a program), tuned (bench train, paper config,
# pallas_docs at the attention section's fastest right launch: model.flash_launch; the
# paper profile then uses that launch too), ncu (Nsight Compute's counters of pallas_docs'
# forward and backward kernels at that launch: occupancy, throughput, why warps stall; into
# ncu.txt, its gist in the summary), profile (the top ops of the
# first kernel's train step, of the small grid's base cohort step and of one small run's
# step), train (bench train, paper config in bf16 per attention kernel, then the fastest of
# them whose loss agrees with the others' with the other norm kernel, cuBLAS for every matmul,
# no GEMM autotuning, 128x384 rows, --gpt2_vocab, scanned layers),
# grid (bench grid:
# grid_speedup of 10/5/2 `small` runs in one vmapped step, grid_eval_speedup of their eval
# decoded together), small (the small grid,
# configs/grids/small5.py: 5 rows x finetune/mixed at `small`, trained as one grid, as far as
# the deadline allows; a later call's `small` on the same warm machine resumes it: the whole
# grid takes more than one call's 10 minutes).
# Writes at most 8 files under OUTDIR: summary.txt (every section's status and figures, then
# the train sections fastest first: the kernel to make the default), bench.jsonl, log.txt,
# results_small.json (each finished run's results.json by run name), ncu.txt.
# Wheels the GPU image lacks come from .whl/ (bash launch/device_wheels.sh, where pip works);
# KSTORE_NO_WHEELS=1 uses the installed packages. --smoke: the same on CPU at toy sizes
# (tests/test_device_check.py runs it). KSTORE_CHECK_SECONDS: the deadline (default 480);
# KSTORE_CHECK_KERNELS: the attention kernels of train/profile (default "pallas_docs tokamax
# pallas"; session 8 measured xla at 26% MFU and cudnn at 5%, against pallas's 39%: the
# deadline goes to the variants instead); KSTORE_CHECK_ATTENTION: the attention section's
# (default "pallas_docs,tokamax,pallas,xla"); KSTORE_CHECK_CACHE: jax's compilation cache
# (default .cache/jax in the checkout, kept between a window's calls; the smoke's: temporary);
# KSTORE_CHECK_RUNS: the small grid's workdir (default .cache/small_runs in the checkout, kept
# between a window's calls, so that `small` resumes the grid; each call's seconds in it are
# added to .cache/small_runs.seconds and the summary sums them; remove both to start the
# grid afresh on a machine that keeps them; the smoke's: temporary);
# KSTORE_CHECK_NCU: the Nsight Compute command (default ncu on the PATH, else the newest
# /opt/nvidia/nsight-compute/*/ncu; none: the ncu section is skipped).
set -uo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"   # the header
  exit 0
fi
SMOKE=0
SECTIONS="env,ceiling,attention,tuned,ncu,profile,train,grid,small"
OUT=""
# every argument is read as what it is: a flag, or the one OUTDIR (a last argument that is a
# flag is no output directory)
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --sections=*) SECTIONS="${1#--sections=}"
                  [ -n "$SECTIONS" ] || { echo "device_check.sh: --sections= names no section" >&2; exit 2; } ;;
    -*) echo "device_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "device_check.sh: unexpected argument '$1' after OUTDIR '$OUT'" >&2; exit 2; }
       OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "device_check.sh: expected OUTDIR (see --help)" >&2; exit 2; }
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
for s in ${SECTIONS//,/ }; do
  case "$s" in env|ceiling|attention|tuned|ncu|profile|train|grid|small) ;;
    *) echo "device_check.sh: unknown section '$s' in --sections" >&2; exit 2 ;; esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT" || exit 2
START=$(date +%s)
DEADLINE="${KSTORE_CHECK_SECONDS:-$([ "$SMOKE" = 1 ] && echo 170 || echo 480)}"
LOG="$OUT/log.txt"; JSON="$OUT/bench.jsonl"; STATUS="$OUT/.status"
: > "$LOG"; : > "$JSON"; : > "$STATUS"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# one compilation cache for every process of this check (the small rows share their shapes)
# and, on a device, for the next call on the same machine (the checkout's ignored .cache/
# stays between a window's calls while the machine is warm): a second call loads what the
# first compiled (the small grid's cohort step, its GEMMs' autotuning) instead of compiling it
# again; the smoke's is its own, in the temporary directory; KSTORE_CHECK_CACHE names another
CACHE="$([ "$SMOKE" = 1 ] && echo "$WORK/jax_cache" || echo "$ROOT/.cache/jax")"
export JAX_COMPILATION_CACHE_DIR="${KSTORE_CHECK_CACHE:-$CACHE}" PYTHONUNBUFFERED=1
# the small grid's runs, likewise kept for the next call on the machine: the whole grid is
# longer than a call may run (10 minutes), so a second call's `small` resumes it (the deadline's
# SIGTERM saves every run where it is; train.save_minutes=4 leaves a checkpoint before that)
RUNS="$([ "$SMOKE" = 1 ] && echo "$WORK/runs" || echo "$ROOT/.cache/small_runs")"
RUNS="${KSTORE_CHECK_RUNS:-$RUNS}"
# shellcheck source=_device_env.sh source-path=SCRIPTDIR
source "$ROOT/launch/_device_env.sh" "" >> "$LOG" 2>&1 || { cat "$LOG"; exit 2; }
PY="${PYTHON:-python3}"

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# stamp T0: each input line prefixed with the whole seconds since T0 ("  12s line")
stamp() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    printf '%5ss %s\n' "$(( ${EPOCHSECONDS:-$(date +%s)} - $1 ))" "$line"
  done
}

# run NAME MAX_SECONDS CMD...: bounded by the deadline (and MAX_SECONDS); JSON lines go to
# bench.jsonl, everything (stdout and stderr, each line stamped) to log.txt; the outcome to
# the status list for the summary. The command gets SIGTERM at its bound and SIGKILL GRACE
# seconds later (default 10; its bound is that much earlier beyond 10, so the deadline holds).
# skip NAME WHY: the status list's line of a section that did not run
skip() { echo "$1 skipped ($2) 0" >> "$STATUS"; }
run() {
  local name="$1" max="$2" grace="${GRACE:-10}"; shift 2
  local budget; budget=$(( $(left) - grace + 10 ))
  [ "$budget" -gt "$max" ] && budget="$max"
  if [ "$budget" -lt 15 ]; then
    skip "$name" deadline; return 0
  fi
  local t0 rc; t0=$(date +%s)
  echo "== $name (<= ${budget}s): $*" >> "$LOG"
  # each output line into the log as it comes, stamped with the seconds since the section
  # began (where a stage's time goes: start, compiles, pauses between progress lines)
  timeout --kill-after="$grace" "$budget" "$@" 2>&1 | stamp "$t0" | tee -a "$LOG" > "$WORK/out"
  rc=${PIPESTATUS[0]}
  sed 's/^ *[0-9]*s //' "$WORK/out" | grep '^{"name"' \
    | sed "s/^{/{\"section\": \"$name\", /" >> "$JSON"
  local how="ok"; [ "$rc" -eq 0 ] || how="FAILED rc=$rc"; [ "$rc" -eq 124 ] && how="TIMEOUT"
  echo "$name $how $(( $(date +%s) - t0 ))" >> "$STATUS"
}

if [ "$SMOKE" = 1 ]; then
  # toy sizes: every section's code path, in seconds on a CPU (a 1-layer model, 4 rows a
  # step: the --gpt2_vocab head alone is 50k x 128 per position)
  PAPER="configs/tiny.py"; KERNELS="xla einsum"; TRAIN_STEPS=2; REPEATS=2
  SIZES=(--config.data.n_people=100 --config.model.num_layers=1 --config.pretrain.batch_size=4)
  SMALL_ARG="tiny"; SMALL_BASE="configs/tiny.py"
  SMALL_OVERRIDES=("${SIZES[@]}" --config.model.d_model=32 --config.model.num_heads=2
                   --config.model.d_ff=64 --config.pretrain.steps=6 --config.finetune.steps=4
                   --config.finetune.batch_size=4 --config.train.save_every=6
                   --config.pretrain_mixed.steps=6 --config.pretrain_mixed.batch_size=4
                   --config.grid.mode=vmap --runs=single_finetune,single_mixed)
  GRID_RUNS="2"; GRID_EVAL=(--grid_eval_people=4); MATMUL=(--matmul_n=512)
  CEILING=("${MATMUL[@]}" --copy_bytes=16777216)
  ATTN=(--attention=einsum,xla,pallas,pallas_docs,tokamax); OTHER_NORM="pallas"
  # the tuned launch is validated and passed, but trained through XLA's attention: an
  # interpreted flash kernel would double the smoke (the launch reaching the kernel is
  # test_attention's)
  TUNED_KERNEL="xla"
else
  PAPER="configs/base.py"; KERNELS="${KSTORE_CHECK_KERNELS:-pallas_docs tokamax pallas}"
  TRAIN_STEPS=10; REPEATS=20; SIZES=()
  # R = 10 and 5: the small grid's cohorts (its 10 base runs share one step, its 5 finetunes
  # another), the largest first: the figure the grid's time rests on; then 2
  SMALL_ARG="small"; SMALL_BASE="configs/base.py:small"
  SMALL_OVERRIDES=(--config.train.save_minutes=4)   # a checkpoint inside a call (RUNS)
  GRID_RUNS="10,5,2"; GRID_EVAL=(); MATMUL=(); CEILING=()
  ATTN=(--attention="${KSTORE_CHECK_ATTENTION:-pallas_docs,tokamax,pallas,xla}")
  OTHER_NORM="xla"; TUNED_KERNEL="pallas_docs"
fi
BENCH=("$PY" -m kstore_jax.bench)
FLASH=()   # the tuned section's launch (--config.model.flash_launch=...), once it has run

section_env() {
  run env 120 bash -c "$PY - <<'EOF'
import importlib, json, platform, sys
import jax
mods = ['jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'array_record',
        'ml_collections', 'tensorboardX', 'tokenizers', 'numpy', 'ml_dtypes']
vers = {m: getattr(importlib.import_module(m), '__version__', '?') for m in mods}
import kstore_jax.tools.main, kstore_jax.tools.report, kstore_jax.eval.qa_eval  # the project imports
from kstore_jax.train import memory   # what a step may use a device (a grid's cohorts fit 90%)
d = jax.devices()
print(json.dumps(dict(name='environment', value=len(d), unit='devices', python=platform.python_version(),
                      device=d[0].device_kind, platform=d[0].platform,
                      device_bytes=memory.device_bytes(d[0]), **vers)))
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv >&2 || true"
}
section_ceiling() {
  run ceiling 90 "${BENCH[@]}" ceiling "${CEILING[@]}"
}
section_attention() {
  run attention 150 "${BENCH[@]}" attention --config="$PAPER" "${SIZES[@]}" "${ATTN[@]}" \
    --attention_repeats="$REPEATS"
}
section_tuned() {   # the paper step at the attention section's fastest right launch
  local launch
  launch=$("$PY" -m kstore_jax.tools.device_report launch "$JSON" 2>>"$LOG")
  echo "tuned launch: ${launch:-the default (flash_docs.LAUNCH)}" >> "$LOG"
  FLASH=(--config.model.flash_launch="$launch")
  run "train_${TUNED_KERNEL}_tuned" 120 "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" \
    --train_steps="$TRAIN_STEPS" --config.model.attention="$TUNED_KERNEL" "${FLASH[@]}" \
    "${MATMUL[@]}"
  # a launch that failed in the whole step (registers, a compile error) is not profiled
  if ! tail -n 1 "$STATUS" | grep -q "^train_${TUNED_KERNEL}_tuned ok "; then
    echo "tuned launch not ok in the train step: the profile runs the default" >> "$LOG"
    FLASH=()
  fi
}
section_ncu() {   # why pallas_docs takes what it takes (1.3 ms a layer at the paper shape,
  # session 35, against a few hundred us by a count of its loads and FLOPs): Nsight Compute's
  # occupancy, throughput, scheduler, warp-stall and source (stall sampling, uncoalesced
  # accesses) sections of its first forward and backward kernels at the tuned launch (the
  # model's before `tuned`), clocks left alone (METHOD.md); the counters read on Firecracker
  # machines, not on gVisor ones (the section then fails alone)
  local ncu
  ncu="${KSTORE_CHECK_NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null \
    | tail -n 1)}"
  if [ -z "$ncu" ]; then
    skip ncu "no ncu"; return 0
  fi
  # (jax not holding 75% of the device from the start: ncu's replays save what a kernel
  # writes)
  XLA_PYTHON_CLIENT_PREALLOCATE=false run ncu 150 "$ncu" --clock-control none \
    --kernel-name regex:flash_docs --launch-count 3 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section SchedulerStats --section WarpStateStats --section SourceCounters \
    --section MemoryWorkloadAnalysis --log-file "$OUT/ncu.txt" \
    "${BENCH[@]}" attention --config="$PAPER" "${SIZES[@]}" --attention=pallas_docs \
    --attention_sweep=false --attention_repeats=1 "${FLASH[@]}"
}
section_profile() {   # where the first kernel's train step spends its time (at the tuned
  # launch once `tuned` has run: its compile is then in the cache); then the small grid's
  # base cohort step (its R runs vmapped) and, on a device, one small run's own step
  run "profile_${KERNELS%% *}" 150 "${BENCH[@]}" profile --config="$PAPER" "${SIZES[@]}" \
    --train_steps=3 --config.model.attention="${KERNELS%% *}" "${FLASH[@]}"
  run profile_grid 150 "${BENCH[@]}" profile --config="$SMALL_BASE" "${SIZES[@]}" \
    --train_steps=3 --cohort_runs="${GRID_RUNS%%,*}"
  [ "$SMOKE" = 1 ] || run profile_small 120 "${BENCH[@]}" profile --config="$SMALL_BASE" \
    --train_steps=3
}
section_train() {   # each kernel at the paper shape, then the fastest one's variants
  for k in $KERNELS; do
    run "train_$k" 120 "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" \
      --train_steps="$TRAIN_STEPS" --config.model.attention="$k" "${MATMUL[@]}"
  done
  # the fastest kernel shown right: a finite loss, a small attention error against XLA f32,
  # the loss within 2% of the kernels' median (a kernel that leaks across documents or the
  # diagonal trains to another loss); the first kernel when none is (the log says why)
  first=$("$PY" -m kstore_jax.tools.device_report pick "$JSON" $KERNELS 2>>"$LOG")
  first="${first:-${KERNELS%% *}}"
  echo "variants' kernel: $first" >> "$LOG"
  # the other norm: XLA's own fusions on a device (model.norm=auto is the fused add+norm
  # kernel on CUDA: the floor says 3% of the step, unmeasured); on the smoke's CPU the kernel,
  # interpreted
  run "train_${first}_norm_${OTHER_NORM}" 120 "${BENCH[@]}" train --config="$PAPER" \
    "${SIZES[@]}" --train_steps="$TRAIN_STEPS" --config.model.attention="$first" \
    --config.model.norm="$OTHER_NORM" "${MATMUL[@]}"
  # XLA's own Triton GEMM fusions off (cuBLAS for every matmul; session 8's xla-step profile
  # had ~15% of its time in gemm_fusion kernels, and their autotuning in the compile)
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" run "train_${first}_cublas" 120 \
    "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" --train_steps="$TRAIN_STEPS" \
    --config.model.attention="$first" "${MATMUL[@]}"
  # XLA's GEMM autotuning off (its heuristic tilings): what the compile spends on it
  # (compile_s) against what the step loses without it
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" run "train_${first}_autotune0" 120 \
    "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" --train_steps="$TRAIN_STEPS" \
    --config.model.attention="$first" "${MATMUL[@]}"
  # every bioS document fits in 128 positions: 128 x (4 x batch) rows are the same function
  # with a quarter of the attention work
  [ "$SMOKE" = 1 ] || run "train_${first}_rows128" 120 "${BENCH[@]}" train --config="$PAPER" \
    --train_steps="$TRAIN_STEPS" --config.model.attention="$first" \
    --config.data.seq_len=128 --config.pretrain.batch_size=384
  run "train_${first}_gpt2_vocab" 120 "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" \
    --train_steps="$TRAIN_STEPS" --config.model.attention="$first" --gpt2_vocab "${MATMUL[@]}"
  # one scanned block instead of 12 unrolled ones: compile time (first_step_s) and step time
  run "train_${first}_scan" 120 "${BENCH[@]}" train --config="$PAPER" "${SIZES[@]}" \
    --train_steps="$TRAIN_STEPS" --config.model.attention="$first" \
    --config.model.scan_layers=True "${MATMUL[@]}"
}
section_grid() {   # R small runs in one vmapped step vs one after another
  run grid 240 "${BENCH[@]}" grid --config="configs/grids/small5.py:$SMALL_ARG" \
    --runs="$GRID_RUNS" --grid_modes=vmap --train_steps="$TRAIN_STEPS" "${GRID_EVAL[@]}" \
    "${SIZES[@]}"
}
section_small() {   # the small grid, one vmapped step per stage (grid.mode auto on a GPU),
  # resumed where an earlier call stopped it (RUNS); 45 s for ten runs' saves after SIGTERM
  GRACE=45 run small 900 "$PY" -m kstore_jax.grid --config="configs/grids/small5.py:$SMALL_ARG" \
    --workdir="$RUNS" "${SMALL_OVERRIDES[@]}"
  mkdir -p "$(dirname "$RUNS")"
  tail -n 1 "$STATUS" | awk '{ print $NF }' >> "$RUNS.seconds"   # this call's share
  "$PY" -m kstore_jax.tools.device_report results "$RUNS" "$OUT/results_small.json"
}

# the sections in the order --sections names them (by default the order above)
for s in ${SECTIONS//,/ }; do "section_$s"; done

"$PY" -m kstore_jax.tools.device_report summary "$OUT" "$(( $(date +%s) - START ))" "$RUNS" \
  > "$OUT/summary.txt"
rm -f "$STATUS"
cat "$OUT/summary.txt"
