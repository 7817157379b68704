"""Where the test suite's CPU goes: every Python process of one suite run, and jax's compile log.

  python3 launch/suite_profile.py OUTDIR [PYTEST ARGS ...]

Installs (into the checkout's .venv, made as launch/test.sh makes it) a start-up hook that each
Python process of the run loads: it records the process's CPU time at exit (its own, not its
children's), its command, the test that started it (PYTEST_CURRENT_TEST, inherited by
subprocesses), and jax's compile log (every tracing, MLIR lowering and XLA compilation with
its seconds and the test running at the time, and each persistent-cache hit) into
OUTDIR/proc-<pid>.jsonl, nothing on the
process's own stdout or stderr. Then runs the suite as launch/test.sh does, removes the hook
(also on failure or Ctrl-C) and writes OUTDIR/summary.txt: CPU by test file and by command,
compile seconds by program and by test, cache hits and misses. A process killed by a signal (the kill -9
tests) leaves its compile log but not its CPU time.
"""

import collections
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOK = "_kstore_suite_profile"
HOOK_SRC = '''
import atexit, json, logging, os, resource, sys, time
_dir = os.environ.get("KSTORE_SUITE_PROFILE_DIR")
if _dir:
  # the file and the test when written, not when this process started: a child of the suite's
  # fork server (tests/forkserver.py) is a process and a test of its own
  def _path():
    return os.path.join(_dir, f"proc-{os.getpid()}.jsonl")
  class _Handler(logging.Handler):
    """Records every message of its logger, and passes on to the usual handlers those the
    process would have shown without the hook (JAX_LOG_COMPILES's: tests read them)."""
    def __init__(self, logger):
      super().__init__()
      self.logger, self.shown = logger, logger.getEffectiveLevel()
    def emit(self, record):
      with open(_path(), "a") as f:
        f.write(json.dumps({"log": record.getMessage(),
                            "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\\n")
      if record.levelno >= self.shown and self.logger.parent is not None:
        self.logger.parent.handle(record)
  for _name in ("jax._src.compiler", "jax._src.interpreters.pxla", "jax._src.pjit",
                "jax._src.dispatch"):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_Handler(_logger))   # (before the level below: it keeps the usual one)
    _logger.setLevel(logging.DEBUG)
    _logger.propagate = False
  def _done():
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(_path(), "a") as f:
      f.write(json.dumps({"argv": sys.argv, "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                          "cpu": r.ru_utime + r.ru_stime,
                          "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}) + "\\n")
  atexit.register(_done)
'''
TIMED = re.compile(r"^Finished (tracing|jaxpr to MLIR module conversion|XLA compilation) "
                   r"(?:of )?(\S+).* in ([0-9.]+) sec")
HIT = re.compile(r"^Persistent compilation cache hit for '([^']+)'")
KIND = {"tracing": "trace", "jaxpr to MLIR module conversion": "mlir",
        "XLA compilation": "xla"}


def site_packages(python: str) -> pathlib.Path:
  return pathlib.Path(subprocess.check_output(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      text=True).strip())


def program(name: str) -> str:
  """jit(<lambda>) (the compile log) and jit__lambda (the cache's) -> lambda."""
  return re.sub(r"\W", "", re.sub(r"^jit[(_]", "", name)).strip("_")


def command(argv: list[str]) -> str:
  """A process's command: its script or module (-c: a pytest-xdist worker, or a snippet)."""
  return os.path.basename(argv[0]) if argv else "?"


def summarise(out: pathlib.Path) -> str:
  cpu, nproc = collections.Counter(), collections.Counter()
  compile_s = collections.defaultdict(collections.Counter)
  counts, hits, total = collections.Counter(), collections.Counter(), 0.0
  by_test = collections.Counter()   # compile seconds (all kinds) by the test running then
  for path in out.glob("proc-*.jsonl"):
    for line in path.read_text().splitlines():
      rec = json.loads(line)
      if "log" in rec:
        if m := TIMED.match(rec["log"]):
          kind, name = KIND[m.group(1)], program(m.group(2))
          compile_s[kind][name] += float(m.group(3))
          counts[name] += kind == "xla"
          by_test[rec.get("test", "").split(" ")[0] or "(no test)"] += float(m.group(3))
        elif m := HIT.match(rec["log"]):
          hits[program(m.group(1))] += 1
        continue
      # PYTEST_CURRENT_TEST is empty in the pytest processes themselves and in subprocesses
      # started with an environment copied before the test began (the device-check smoke)
      key = (rec["test"].split("::")[0] or "(no test)", command(rec["argv"]))
      cpu[key] += rec["cpu"]
      nproc[key] += 1
      total += rec["cpu"]
  lines = [f"{sum(nproc.values())} processes, {total:.1f} CPU-s (those that exited normally)",
           "", "CPU-s by the test that started the process, and its command (processes):"]
  lines += [f"  {s:8.1f}  {nproc[k]:4d}  {k[0]}  {k[1]}" for k, s in cpu.most_common(30)]
  lines += ["", "compile seconds: " + ", ".join(
      f"{k} {sum(v.values()):.1f}" for k, v in sorted(compile_s.items())),
      f"XLA compilations {sum(counts.values())}, persistent-cache hits {sum(hits.values())}",
      "", "programs by XLA seconds (XLA s, compilations, cache hits, tracing s, MLIR s):"]
  lines += [f"  {s:7.1f}  {counts[n]:4d}  {hits[n]:4d}  {compile_s['trace'][n]:6.1f}  "
            f"{compile_s['mlir'][n]:6.1f}  {n}" for n, s in compile_s["xla"].most_common(25)]
  lines += ["", "compile seconds (tracing + MLIR + XLA) by the test running at the time "
            "(a pytest process's own tests, and subprocesses by the test that started them):"]
  lines += [f"  {s:7.1f}  {t}" for t, s in by_test.most_common(40)]
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) < 1 or argv[0].startswith("-"):
    sys.exit("usage: python3 launch/suite_profile.py OUTDIR [PYTEST ARGS ...]")
  out = pathlib.Path(argv[0]).resolve()
  out.mkdir(parents=True, exist_ok=True)
  subprocess.run(["bash", "-c", f"source {ROOT}/launch/_venv.sh test"], check=True)
  python = os.path.join(os.environ.get("KSTORE_VENV") or ROOT / ".venv", "bin", "python")
  site = site_packages(python)
  files = [site / f"{HOOK}.py", site / f"{HOOK}.pth"]
  files[0].write_text(HOOK_SRC)
  files[1].write_text(f"import {HOOK}\n")
  try:
    env = {**os.environ, "KSTORE_SUITE_PROFILE_DIR": str(out)}
    rc = subprocess.run(["bash", str(ROOT / "launch" / "test.sh"), *argv[1:]], env=env,
                        check=False).returncode
  finally:
    for f in files:
      f.unlink(missing_ok=True)
  text = summarise(out)
  (out / "summary.txt").write_text(text)
  print(text, end="")
  sys.exit(rc)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--summary"]:   # again, from an earlier run's OUTDIR
    print(summarise(pathlib.Path(sys.argv[2])), end="")
  else:
    main(sys.argv[1:])
