"""The prepared device check's bookkeeping (launch/device_check.sh calls it between sections):

    python -m kstore_jax.tools.device_report pick BENCH_JSONL KERNEL...   # the variants' kernel
    python -m kstore_jax.tools.device_report launch BENCH_JSONL   # the fastest right launch
    python -m kstore_jax.tools.device_report results RUNS_DIR OUT_JSON    # the small runs' results
    python -m kstore_jax.tools.device_report summary OUTDIR SECONDS RUNS_DIR   # summary.txt

BENCH_JSONL holds the sections' bench lines, each with its `section` (`train_<kernel>` for the
train runs); OUTDIR/.status one `NAME HOW... SECONDS` line per section; OUTDIR/ncu.txt, where
the ncu section ran, Nsight Compute's report of the attention kernels.
"""

import argparse
import json
import math
import os
import statistics
import sys

from kstore_jax import rundir

SUMMARY_KEYS = ("op", "scope", "kind", "share", "floor_us", "floor_us_per_step", "cohort_runs",
                "alone_mfu", "grid_mfu", "attention", "dtype", "vocab", "seq_len", "batch_size",
                "tflops_per_s", "fwd_ms", "tiles_visited", "launch", "flash_launch",
                "rel_err_out", "rel_err_dq", "skipped", "loss", "first_step_s", "compile_s",
                "device", "jax", "source")


def read_lines(path: str) -> list[dict]:
  """The JSON objects of `path`, a line each; a line that is none (a library's log line in
  the pipe the benchmarks print to, or a line another cut) is left out: the summary goes on
  (the raw file comes back whole)."""
  out = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        out.append(row)
  return out


ATTENTION_TOLERANCE = 0.05   # a bf16 flash kernel vs XLA in f32 (attention section): ~1e-2


def attention_errors(lines: list[dict]) -> dict[str, float]:
  """{kernel: its largest relative error against XLA in f32} of the attention section's
  lines (`attention_<kernel>_ms`, output and gradients), where it measured one."""
  out = {}
  for r in lines:   # (the ncu section's line of its launch has the same name: not its)
    name = r["name"]
    if (r.get("section") == "attention" and name.startswith("attention_")
        and name.endswith("_ms") and "rel_err_out" in r):
      errs = [r[k] for k in ("rel_err_out", "rel_err_dq", "rel_err_dk", "rel_err_dv") if k in r]
      out[name[len("attention_"):-len("_ms")]] = max(errs)
  return out


def pick_kernel(lines: list[dict], kernels: list[str], tolerance: float = 0.02) -> str | None:
  """The fastest of `kernels` by its `train_<kernel>` step time among those that are right:
  a finite loss after the timed steps, an attention error against XLA in f32 under
  ATTENTION_TOLERANCE where the attention section measured it, and (with three or more)
  a loss within `tolerance` (relative) of their median: a kernel that leaks across
  documents or the diagonal trains to another loss (same model, data and init otherwise).
  Two that disagree cannot be told apart: None, as when none finished."""
  sections = {f"train_{k}" for k in kernels}
  errs = attention_errors(lines)
  runs = {r["section"][len("train_"):]: r for r in lines
          if r["name"] == "train_step_s" and r["section"] in sections}
  runs = {k: r for k, r in runs.items()
          if math.isfinite(r["loss"]) and errs.get(k, 0.0) <= ATTENTION_TOLERANCE}
  if not runs:
    return None
  median = statistics.median(r["loss"] for r in runs.values())
  agree = [k for k, r in runs.items() if abs(r["loss"] - median) <= tolerance * abs(median)]
  return min(agree, key=lambda k: runs[k]["value"]) if agree else None


def pick_launch(lines: list[dict]) -> str | None:
  """The launch (as model.flash_launch names it) of the fastest pallas_docs launch the
  attention section timed whose error against XLA in f32 is under ATTENTION_TOLERANCE, when
  it is not the model's own (`attention_pallas_docs_ms`, flash_docs.LAUNCH); None when the
  model's is the fastest right one, or none is right."""
  errs = attention_errors(lines)
  prefix = "attention_pallas_docs"
  right = {r["name"]: r for r in lines
           if r.get("section") == "attention" and r["name"].startswith(prefix)
           and r["value"] is not None and "launch" in r
           and errs.get(r["name"][len("attention_"):-len("_ms")], math.inf)
           <= ATTENTION_TOLERANCE}
  best = min(right.values(), key=lambda r: r["value"], default=None)
  return None if best is None or best["name"] == f"{prefix}_ms" else best["launch"]


def run_names(runs_dir: str) -> list[str]:
  """The run directories' names under runs_dir (none when the grid never started; its own
  files, grid.json, are no runs)."""
  if not os.path.isdir(runs_dir):
    return []
  return sorted(n for n in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, n)))


def small_calls(runs_dir: str) -> list[int]:
  """The seconds each call's `small` section ran the grid in runs_dir (device_check.sh adds
  a line to `<runs_dir>.seconds` a call: the grid resumes across a window's calls), in order;
  the calls that skipped it (0 s) left out."""
  path = f"{runs_dir.rstrip(os.sep)}.seconds"
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [int(w) for w in f.read().split() if w.isdigit() and int(w) > 0]


def collect_results(runs_dir: str) -> dict:
  """Each finished run's results.json under runs_dir, by run name."""
  found = {}
  for name in run_names(runs_dir):
    path = os.path.join(runs_dir, name, rundir.RESULTS)
    if os.path.exists(path):
      found[name] = rundir.read_json(path)
  return found


# Nsight Compute's details page (ncu.txt): the metrics summary.txt keeps of each kernel (its
# sections SpeedOfLight, Occupancy, LaunchStats, SchedulerStats, WarpStateStats,
# SourceCounters, MemoryWorkloadAnalysis), and its rules' sentences on why warps stall
NCU_METRICS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput",
               "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy",
               "Block Limit Registers", "Warp Cycles Per Issued Instruction",
               "Issued Warp Per Scheduler", "No Eligible", "Active Warps Per Scheduler",
               "Eligible Warps Per Scheduler", "Grid Size", "Block Size")


def ncu_summary(path: str) -> list[str]:
  """summary.txt's lines of an ncu report: each profiled kernel's header line (its name, grid
  and block), its NCU_METRICS (name, unit, value as ncu prints them) and the rule sentences
  that say where its warps stall."""
  text = []
  with open(path, errors="replace") as f:
    for line in f:
      line = " ".join(line.split())
      if not line:
        continue
      if ", Context " in line and ", Device " in line:   # a kernel's header
        text.append(f"ncu {line[:150]}")
      elif line.startswith(NCU_METRICS):
        text.append(f"ncu   {line[:120]}")
      elif "stalled" in line or "Est. Speedup" in line:
        text.append(f"ncu   {line[:220]}")
  return text


def summary(out: str, took: str, runs_dir: str) -> str:
  """summary.txt: each section's status and seconds, every bench line, the attention kernels
  and launches fastest first with their largest error (those over ATTENTION_TOLERANCE
  flagged: the launch to make the model's), the attention kernels' hardware counters (ncu),
  the train sections fastest first (the kernel and variant to make the default), the small
  runs' last metrics and results."""
  text = [f"device_check: {took} s"]
  with open(os.path.join(out, ".status")) as f:
    for line in f:
      name, *how, secs = line.split()
      text.append(f"  {name:28s} {' '.join(how):14s} {secs:>4s} s")
  lines = read_lines(os.path.join(out, "bench.jsonl"))
  for r in lines:
    extra = " ".join(f"{k}={str(r[k])[-70:]}" for k in SUMMARY_KEYS if k in r and r[k] != "")
    text.append(f"{r['section']:14s} {r['name']:30s} {r['value']!s:>12s} {r['unit']:9s} {extra}")
  errs = attention_errors(lines)
  timed = sorted((r for r in lines if r["section"] == "attention" and r["name"].startswith(
      "attention_") and r["value"] is not None), key=lambda r: r["value"])
  for rank, r in enumerate(timed, 1):
    kernel = r["name"][len("attention_"):-len("_ms")]
    err = errs.get(kernel, float("nan"))
    text.append(f"attention {rank}: {kernel:26s} {r['value']:.3f} ms  largest error {err:.2e}"
                + ("" if err <= ATTENTION_TOLERANCE else "  WRONG (over the tolerance)"))
  if os.path.exists(os.path.join(out, "ncu.txt")):
    text += ncu_summary(os.path.join(out, "ncu.txt"))
  by = lambda name: {r["section"]: r for r in lines if r["name"] == name}
  mfu, hours = by("train_mfu"), by("pretrain_projected_hours")
  for rank, r in enumerate(sorted(by("train_step_s").values(), key=lambda r: r["value"]), 1):
    sec = r["section"]
    got = lambda by_section: by_section[sec]["value"] if sec in by_section else "-"
    text.append(f"fastest {rank}: {sec:28s} {r['value']:.4f} s/step  mfu {got(mfu)}  "
                f"pretrain {got(hours)} h  attention={r['attention']} loss={r['loss']}"
                + (f" flash_launch={r['flash_launch']}" if r.get("flash_launch") else ""))
  results = collect_results(runs_dir)
  if calls := small_calls(runs_dir):
    text.append(f"small grid: {len(results)} of {len(run_names(runs_dir))} runs finished after "
                f"{sum(calls)} s in {len(calls)} call(s) ({' + '.join(map(str, calls))} s)")
  for row in run_names(runs_dir):
    for stage in ("pretrain", "pretrain_mixed", "finetune"):
      rows = rundir.read_metrics(rundir.metrics_file(rundir.stage_dir(
          os.path.join(runs_dir, row), stage)))   # a line cut short is skipped
      if rows:
        last = rows[-1]
        text.append(f"small {row} {stage}: step {last.get('step')} loss "
                    f"{last.get('loss', 0):.4f} {last.get('tokens_per_s', 0):.0f} tokens/s "
                    f"mfu {last.get('mfu')}")
    if row in results:
      r = results[row]
      text.append(f"small {row}: qa_test {r['qa_test']['mean']:.4f} qa_train "
                  f"{r['qa_train']['mean']:.4f} bio_recall {r['bio_recall']['mean']:.4f}")
  return "\n".join(text) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m kstore_jax.tools.device_report")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("pick")
  p.add_argument("bench_jsonl")
  p.add_argument("kernels", nargs="+")
  p = sub.add_parser("launch")
  p.add_argument("bench_jsonl")
  p = sub.add_parser("results")
  p.add_argument("runs_dir")
  p.add_argument("out_json")
  p = sub.add_parser("summary")
  p.add_argument("outdir")
  p.add_argument("seconds")
  p.add_argument("runs_dir")
  args = parser.parse_args(argv)
  if args.command == "pick":
    lines = read_lines(args.bench_jsonl) if os.path.exists(args.bench_jsonl) else []
    picked = pick_kernel(lines, args.kernels)
    if picked is None:   # the caller takes the first kernel; the log says why
      print(f"device_report pick: no train_<kernel> run of {' '.join(args.kernels)} is shown "
            "right (none finished with a finite loss and a small attention error, or two "
            "disagree): the first kernel's variants run", file=sys.stderr)
    print(picked or "")
  elif args.command == "launch":
    lines = read_lines(args.bench_jsonl) if os.path.exists(args.bench_jsonl) else []
    launch = pick_launch(lines)
    if launch is None:   # the caller trains the model's own launch; the log says why
      print("device_report launch: no pallas_docs launch timed by the attention section is "
            "both right and faster than the model's", file=sys.stderr)
    print(launch or "")
  elif args.command == "results":
    found = collect_results(args.runs_dir)
    if found:
      with open(args.out_json, "w") as f:
        json.dump(found, f, indent=1)
  else:
    print(summary(args.outdir, args.seconds, args.runs_dir), end="")


if __name__ == "__main__":
  main()
