"""`bash launch/device_check.sh --smoke`: the prepared GPU check end to end on this CPU at toy
sizes, so the first call on a lent GPU cannot fail on a typo; and its argument errors."""

import json
import os
import re
import subprocess

import runs
from kstore_jax import configlib
from kstore_jax.model import flash_docs
from kstore_jax.tools import device_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every program into the script's compilation cache, however fast it compiled (jax's default
# skips those under a second: the toy steps), so a section reuses what an earlier one compiled
ENV = {"KSTORE_NO_WHEELS": "1", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def check(*args, timeout=400, env=None):
  """The script in this process's environment with ENV and `env`, its Python processes
  started by runs.python()."""
  return subprocess.run(["bash", "launch/device_check.sh", *args], cwd=ROOT,
                        env={**os.environ, **ENV, **(env or {}), "PYTHON": runs.python()},
                        capture_output=True, text=True, timeout=timeout, check=False)


# A stand-in for Nsight Compute (none on this CPU): it takes ncu's options (each with a value),
# writes a report in ncu's layout with them to --log-file, and runs the program after them.
FAKE_NCU = r"""#!/usr/bin/env bash
opts=()
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  opts+=("$1" "$2"); [ "$1" = --log-file ] && log="$2"; shift 2
done
{ echo "==PROF== options: ${opts[*]}; preallocate ${XLA_PYTHON_CLIENT_PREALLOCATE:-unset}"
  echo "  flash_docs_forward (2, 4, 2)x(128, 1, 1), Context 1, Stream 7, Device 0, CC 9.0"
  echo "    Section: GPU Speed Of Light Throughput"
  echo "    Duration                         us        61.60"
  echo "    DRAM Frequency                  Ghz         2.61"
  echo "          On average, each warp of this kernel spends 12.3 cycles being stalled waiting"
} > "$log"
exec "$@"
"""


def test_smoke_runs_every_section(tmp_path):
  out = tmp_path / "out"
  ncu = tmp_path / "ncu"
  ncu.write_text(FAKE_NCU)
  ncu.chmod(0o755)
  # the smoke's own deadline (170 s) is for a quiet machine; this test asks that every section
  # runs, so a loaded CI machine (the sections skipped at the deadline: a failure) gets more.
  # Compiled as the other tests' runs are (runs.fast_compile_flags: toy steps, so compiling is
  # most of the smoke's CPU time; 126 -> 90 CPU-s measured)
  env = {"XLA_FLAGS": runs.fast_compile_flags(), "KSTORE_CHECK_RUNS": str(tmp_path / "runs")}
  proc = check("--smoke", str(out), env={**env, "KSTORE_CHECK_SECONDS": "420",
                                         "KSTORE_CHECK_NCU": str(ncu)}, timeout=480)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  files = sorted(os.listdir(out))
  assert len(files) <= 8 and {"summary.txt", "bench.jsonl", "log.txt",
                              "results_small.json", "ncu.txt"} <= set(files), files
  summary = (out / "summary.txt").read_text()
  status = [l.split() for l in summary.splitlines()[1:] if l.startswith("  ")]
  sections = {s[0]: s[1] for s in status}
  lines = [json.loads(l) for l in (out / "bench.jsonl").read_text().splitlines()]
  # the variants run on the faster of the two kernels (their losses agree: same model)
  kernel_s = {l["section"]: l["value"] for l in lines
              if l["name"] == "train_step_s" and l["section"] in ("train_xla", "train_einsum")}
  first = min(kernel_s, key=kernel_s.get)
  assert set(sections) == {"env", "ceiling", "attention", "train_xla_tuned", "ncu", "profile_xla",
                           "profile_grid", "train_xla",
                           "train_einsum", f"{first}_norm_pallas", f"{first}_cublas",
                           f"{first}_autotune0",
                           f"{first}_gpt2_vocab",
                           f"{first}_scan", "grid", "small"}, summary
  assert all(how == "ok" for how in sections.values()), summary
  names = {(l["section"], l["name"]) for l in lines}
  env_line = next(l for l in lines if l["name"] == "environment")   # the grid's budget's base
  assert 0 < env_line["device_bytes"] <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for want in [("env", "environment"), ("ceiling", "matmul_bfloat16_flops_per_s"),
               ("attention", "attention_pallas_ms"), ("attention", "attention_pallas_docs_ms"),
               ("attention", "attention_tokamax_ms"),
               ("profile_xla", "profile_step_s"), ("profile_grid", "profile_op_us"),
               ("train_xla", "train_tokens_per_s"), (f"{first}_gpt2_vocab", "train_step_s"),
               ("grid", "grid_speedup"), ("grid", "grid_eval_speedup")]:
    assert want in names, want
  # each kernel at the model's settings also times its forward pass alone (a launch does not);
  # not compared with the whole pass's time: the smoke's medians of 2 calls on a shared CPU
  # are noise (98 ms forward against 41 ms both passes, seen once in a suite run)
  attn = {l["name"]: l for l in lines if l["section"] == "attention"}
  # each measured once (the log's copy of a section's output is not read as a second line)
  assert len(attn) == sum(l["section"] == "attention" for l in lines)
  assert attn["attention_pallas_docs_ms"]["fwd_ms"] > 0
  assert "fwd_ms" not in attn["attention_pallas_docs_t32_ms"]
  # the tuned section trained (and the paper profile ran) at the attention section's fastest
  # right launch, passed as model.flash_launch (none: the model's own was the fastest)
  launch = device_report.pick_launch(lines)
  for section in ("train_xla_tuned", "profile_xla"):
    assert {l.get("flash_launch") for l in lines if l["section"] == section} == {launch}
  assert f"tuned launch: {launch or 'the default'}" in (out / "log.txt").read_text()
  # ncu ran pallas_docs alone at that launch (no sweep), clocks left alone, its report's
  # kernel header, metrics and stall sentence in the summary (not the metrics it does not keep)
  ncu_lines = [l for l in lines if l["section"] == "ncu"]
  assert [l["name"] for l in ncu_lines] == ["attention_pallas_docs_ms"], ncu_lines
  assert ncu_lines[0]["launch"] == flash_docs.launch_text(flash_docs.parse_launch(launch or ""))
  report = (out / "ncu.txt").read_text()
  assert "--clock-control none" in report and "--kernel-name regex:flash_docs" in report
  assert "preallocate false" in report   # jax leaves the device's memory to ncu's replays
  assert "ncu flash_docs_forward (2, 4, 2)x(128, 1, 1), Context 1" in summary
  assert "ncu   Duration us 61.60" in summary and "being stalled waiting" in summary
  assert "DRAM Frequency" not in summary
  # the train sections ranked by step time (the session's pick of the default kernel)
  steps = {l["section"]: l["value"] for l in lines if l["name"] == "train_step_s"}
  ranked = [l.split()[2] for l in summary.splitlines() if l.startswith("fastest ")]
  assert sorted(ranked) == sorted(steps) and ranked == sorted(steps, key=steps.get), ranked
  train = {l["name"]: l for l in lines if l["section"] == "train_xla"}
  projected = train["pretrain_projected_hours"]
  steps = configlib.load_config_file(os.path.join(ROOT, "configs/tiny.py")).pretrain.steps
  assert projected["value"] > 0 and projected["steps"] == steps   # tiny's pretrain stage
  assert abs(projected["value"] - train["train_step_s"]["value"] * steps / 3600) < 2e-3
  step = train["train_step_s"]   # the step's compile alone, part of its first step's seconds
  assert 0 < step["compile_s"] <= step["first_step_s"], step
  vocab = {l["vocab"] for l in lines if l["section"] == f"{first}_gpt2_vocab" and "vocab" in l}
  assert vocab == {50304}
  results = json.loads((out / "results_small.json").read_text())
  assert set(results) == {"single_finetune", "single_mixed"}   # the grid's two runs asked for
  assert all(0.0 <= r["qa_test"]["mean"] <= 1.0 for r in results.values())
  for run in results:
    assert f"small {run}: qa_test" in summary and f"small {run}: qa_test" in proc.stdout
  assert re.search(r"^small grid: 2 of 2 runs finished after \d+ s in 1 call\(s\)", summary,
                   re.M), summary
  # a later call's `small` (a window's next call, on the same machine) goes on with the grid in
  # KSTORE_CHECK_RUNS, here finished: nothing trained again, and the calls' seconds add up
  again = check("--smoke", "--sections=small", str(tmp_path / "out2"),
                env={**env, "KSTORE_CHECK_SECONDS": "150"}, timeout=200)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
  summary2 = (tmp_path / "out2" / "summary.txt").read_text()
  calls = re.search(r"^small grid: 2 of 2 runs finished after (\d+) s in 2 call\(s\) "
                    r"\((\d+) \+ (\d+) s\)", summary2, re.M)
  assert calls and int(calls[1]) == int(calls[2]) + int(calls[3]), summary2
  assert json.loads((tmp_path / "out2" / "results_small.json").read_text()) == results
  # the grid profiled as its cohort runs: R runs in one step (the cohort's tokens counted)
  grid = [l for l in lines if l["section"] == "profile_grid"]
  assert all(l["cohort_runs"] == 2 for l in grid) and grid[0]["name"] == "profile_step_s"
  # each profile's time by kind of op, the matmuls among them, their shares summing to one
  for section in ("profile_xla", "profile_grid"):
    kinds = {l["kind"]: l["share"] for l in lines
             if l["section"] == section and l["name"] == "profile_kind_us"}
    assert "matmul" in kinds and abs(sum(kinds.values()) - 1) < 0.01, (section, kinds)
  # every line of a section's output is in the log as it came, stamped with its second
  log = (out / "log.txt").read_text()
  small = log[log.index("== small"):].splitlines()[1:]
  assert any(re.fullmatch(r" *\d+s \[grid\] \d+ run\(s\), mode vmap: .*", l) for l in small)
  assert any(re.fullmatch(r" *\d+s \[single_finetune/pretrain\] done: .* in saves and evals\)",
                          l) for l in small)


def test_sections_run_in_the_order_named(tmp_path):
  """--sections=ceiling,env runs ceiling first: a window's second call puts its most wanted
  section first, before the deadline can cut it."""
  proc = check("--smoke", "--sections=ceiling,env", str(tmp_path), timeout=200)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  summary = (tmp_path / "summary.txt").read_text()
  assert [l.split()[0] for l in summary.splitlines()[1:] if l.startswith("  ")] == [
      "ceiling", "env"], summary


def test_help_is_the_header_whole():
  """--help prints the script's header comment, every line of it and no code (a fixed line
  range printed a code line, or cut the header, each time the header grew or shrank)."""
  text = open(os.path.join(ROOT, "launch", "device_check.sh")).read().splitlines()
  end = next(i for i, l in enumerate(text) if i and not l.startswith("#"))
  header = [re.sub(r"^# ?", "", l) for l in text[1:end]]
  proc = check("--help", timeout=30)
  assert proc.returncode == 0 and proc.stdout.splitlines() == header, proc.stdout[-500:]


def test_bad_arguments_are_one_line(tmp_path):
  for args, culprit in ((["--sections=env,typo", str(tmp_path)], "typo"),
                        (["--fast", str(tmp_path)], "--fast"), ([], "OUTDIR"),
                        (["--smoke"], "OUTDIR"), (["--sections=train"], "OUTDIR"),
                        (["--sections=", str(tmp_path)], "--sections= names no section"),
                        ([str(tmp_path), "other"], "'other'")):
    proc = check(*args, timeout=60)
    assert proc.returncode == 2 and culprit in proc.stderr and len(
        proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_pick_kernel_skips_a_kernel_whose_loss_disagrees(tmp_path):
  """The variants' kernel: the fastest train_<kernel> run among those whose loss agrees with
  the others' (a leaky mask trains to a lower loss, and may be faster); variants' sections
  and other lines do not count; none finished: none (the script takes the first kernel)."""
  def line(section, name, value, loss):
    return {"section": section, "name": name, "value": value, "loss": loss}
  lines = [line("train_a", "train_step_s", 0.050, 5.00),
           line("train_leaky", "train_step_s", 0.030, 4.10),
           line("train_c", "train_step_s", 0.060, 5.02),
           line("train_c_cublas", "train_step_s", 0.010, 5.02),
           line("train_c", "train_tokens_per_s", 1e9, 5.02)]
  assert device_report.pick_kernel(lines, ["leaky", "a", "c"]) == "a"
  assert device_report.pick_kernel(lines[2:], ["leaky", "a", "c"]) == "c"
  assert device_report.pick_kernel([], ["leaky", "a", "c"]) is None
  path = tmp_path / "bench.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  pick = subprocess.run([runs.python(), "-m", "kstore_jax.tools.device_report", "pick",
                         str(path), "leaky", "a", "c"], cwd=ROOT, capture_output=True,
                        text=True, check=False)
  assert pick.returncode == 0 and pick.stdout.strip() == "a", pick.stderr


def test_pick_kernel_needs_a_finite_loss_and_a_right_attention():
  """With two kernels the median sits halfway: neither 'agrees' when they differ, and a NaN
  made the median NaN; both fell back to the first kernel, right or not (the H200 record
  has a NaN-loss cudnn run and one 32% off). A NaN loss or an attention section error over
  ATTENTION_TOLERANCE rules a kernel out; two finite, unflagged ones that differ: None."""
  def train(k, s, loss):
    return {"section": f"train_{k}", "name": "train_step_s", "value": s, "loss": loss}
  def attn(k, err):
    return {"section": "attention", "name": f"attention_{k}_ms", "value": 1.0,
            "rel_err_out": err / 2, "rel_err_dq": err, "rel_err_dk": 0.0, "rel_err_dv": 0.0}
  pick = device_report.pick_kernel
  assert pick([train("x", 0.05, float("nan")), train("p", 0.07, 5.0)], ["x", "p"]) == "p"
  wrong = [train("x", 0.05, 4.0), train("p", 0.07, 5.0)]
  assert pick(wrong, ["x", "p"]) is None
  assert pick(wrong + [attn("x", 0.3), attn("p", 0.01)], ["x", "p"]) == "p"
  # another section's attention line (the ncu section's, of one launch) is not the kernel's
  assert pick(wrong + [attn("x", 0.3), attn("p", 0.01), {**attn("x", 0.001), "section": "ncu"},
                       {**attn("p", 0.9), "section": "ncu"}], ["x", "p"]) == "p"
  assert pick([train("x", 0.05, 5.01), train("p", 0.07, 5.0)], ["x", "p"]) == "x"


def test_pick_launch_is_the_fastest_right_one_when_not_the_models(tmp_path):
  """The tuned section trains the attention section's fastest pallas_docs launch whose error
  is under ATTENTION_TOLERANCE (a leaky launch may be the fastest of all), by its `launch`
  text; none when the model's own is the fastest right one or nothing was timed."""
  def attn(suffix, ms, err, launch):
    return {"section": "attention", "name": f"attention_pallas_docs{suffix}_ms", "value": ms,
            "rel_err_out": err, "rel_err_dq": err, "launch": launch}
  model = attn("", 1.3, 3e-3, "block=64,warps=4,stages=2,heads=1,split=0")
  fast = attn("_w8s1", 0.9, 4e-3, "block=64,warps=8,stages=1,heads=1,split=0")
  leaky = attn("_t128", 0.5, 0.3, "block=128,warps=4,stages=2,heads=1,split=0")
  skipped = {"section": "attention", "name": "attention_pallas_docs_h4_ms", "value": None,
             "skipped": "heads"}
  other = {**attn("", 0.1, 1e-3, ""), "name": "attention_pallas_ms"}   # another kernel
  lines = [model, fast, leaky, skipped, other]
  assert device_report.pick_launch(lines) == fast["launch"]
  assert device_report.pick_launch([model, leaky, other]) is None
  assert device_report.pick_launch([]) is None
  path = tmp_path / "bench.jsonl"
  # a library's log line in the benchmarks' pipe, and a line it cut: left out, not fatal
  text = [json.dumps(l) for l in lines]
  path.write_text("\n".join([*text[:2], "E1205 a C++ log line", text[4][:20], *text[2:]]) + "\n")
  got = subprocess.run([runs.python(), "-m", "kstore_jax.tools.device_report", "launch",
                        str(path)], cwd=ROOT, capture_output=True, text=True, check=False)
  assert got.returncode == 0 and got.stdout.strip() == fast["launch"], got.stderr


ATTENTION_FAILS = """
import importlib, sys
from kstore_jax.model import attention
bench = importlib.import_module("kstore_jax.tools.bench")   # (a process of its own)
kernel = attention.self_attention
def failing(impl, *args, **kwargs):   # as a launch the chip cannot build fails on a GPU
  if impl == "einsum":
    raise ValueError("Triton cannot build this launch")
  return kernel(impl, *args, **kwargs)
attention.self_attention = failing
sys.argv = ["bench", "attention", "--config=configs/base.py:tiny", "--attention=einsum,xla",
            "--attention_repeats=2", "--attention_sweep=false"]
bench.run()
"""


def test_an_attention_variant_that_fails_to_build_is_a_line_and_the_rest_run():
  """One variant the device cannot compile ended the attention section, every later launch of
  the sweep lost with it: it is now a `failed:` line and the next variant is timed."""
  r = subprocess.run([runs.python(), "-c", ATTENTION_FAILS], cwd=ROOT, env=runs.env(),
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  got = {l["name"]: l for l in map(json.loads, r.stdout.splitlines()) if "name" in l}
  assert got["attention_einsum_ms"]["value"] is None
  assert got["attention_einsum_ms"]["skipped"] == ("failed: ValueError: Triton cannot build "
                                                   "this launch")
  assert got["attention_xla_ms"]["value"] > 0


def test_summary_ranks_attention_launches_and_flags_wrong_ones(tmp_path):
  """summary.txt lists the attention lines fastest first with their largest error; one over
  ATTENTION_TOLERANCE (a leaky launch can be the fastest) says so; skipped lines are left out."""
  def attn(kernel, ms, err):
    return {"section": "attention", "name": f"attention_{kernel}_ms", "value": ms,
            "unit": "ms", "rel_err_out": err, "rel_err_dq": err / 2}
  lines = [attn("pallas_docs", 1.3, 3e-3), attn("pallas_docs_h2", 0.9, 4e-3),
           attn("pallas_docs_t128", 0.5, 0.3),
           {"section": "attention", "name": "attention_cudnn_ms", "value": None, "unit": "ms",
            "skipped": "cpu"}]
  (tmp_path / "bench.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  (tmp_path / ".status").write_text("attention ok 30\n")
  text = device_report.summary(str(tmp_path), "30", str(tmp_path / "runs"))
  ranked = [l.split() for l in text.splitlines() if l.startswith("attention ")
            and l.split()[1].endswith(":")]
  assert [r[2] for r in ranked] == ["pallas_docs_t128", "pallas_docs_h2", "pallas_docs"]
  assert "WRONG" in " ".join(ranked[0]) and not any("WRONG" in " ".join(r) for r in ranked[1:])
  assert ranked[1][7] == "4.00e-03", ranked[1]   # its largest error: dq's 2e-3 is smaller
