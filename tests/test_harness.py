"""The suite's own machinery (tests/runs.py): the fast-compile flags keep what this jaxlib knows.
An XLA that no longer knows one of them (jax 0.12 dropped --xla_cpu_use_fusion_emitters) must
cost that flag alone, not the whole set: the suite then compiled every run at XLA's defaults
(on Python 3.12 with jax 0.12, BENCHMARKS.md session 28). The fork server (tests/forkserver.py)
gives a tool's child the requester's stdio, working directory, environment, cores, signals and
exit status."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import runs


def test_an_unknown_fast_compile_flag_is_dropped_alone(monkeypatch):
  known = runs.FAST_COMPILE_FLAGS[0]
  monkeypatch.setattr(runs, "FAST_COMPILE_FLAGS", (known, "--xla_kstore_no_such_flag=true"))
  monkeypatch.delenv("KSTORE_TEST_FAST_FLAGS")
  runs.fast_compile_flags.cache_clear()
  try:
    assert runs.fast_compile_flags() == known
  finally:   # the session's answer again (monkeypatch restores the environment after this)
    runs.fast_compile_flags.cache_clear()


def test_optimized_jit_sets_back_only_the_flags_in_use(monkeypatch):
  monkeypatch.setenv("KSTORE_TEST_FAST_FLAGS", "--xla_backend_optimization_level=0")
  runs.fast_compile_flags.cache_clear()
  try:
    assert runs.xla_defaults() == {"xla_backend_optimization_level": 3}
    assert int(runs.optimized_jit(lambda x: x + 1)(1)) == 2
  finally:
    runs.fast_compile_flags.cache_clear()


# -- tests/forkserver.py: a forked child is the requester's process ---------------------------
PROBE = '''
import json, os, signal, sys, time
preloaded = "jax" in sys.modules
import jax
if sys.argv[1] == "report":
  print(json.dumps({"preloaded": preloaded, "argv": sys.argv[1:], "cwd": os.getcwd(),
                    "xla_flags": os.environ.get("XLA_FLAGS"), "stdin": sys.stdin.read(),
                    "affinity": sorted(os.sched_getaffinity(0)),
                    "cache": jax.config.jax_compilation_cache_dir}))
  sys.exit(3)
if sys.argv[1] == "wait":   # a SIGTERM handler that exits 5; its pid for the test
  signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(5)))
  open(sys.argv[2], "w").write(str(os.getpid()))
  time.sleep(120)
if sys.argv[1] == "die":
  os.kill(os.getpid(), signal.SIGKILL)
raise ValueError("uncaught")
'''


def _probe(tmp_path, *args, env=None, pin=(), **kw):
  (tmp_path / "fs_probe.py").write_text(PROBE)
  return subprocess.Popen([*pin, runs.python(), "-m", "fs_probe", *args], cwd=tmp_path,
                          env=env or runs.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path, timeout=60):
  deadline = time.time() + timeout
  while not (path.exists() and path.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  return int(path.read_text())


@pytest.fixture
def server(forkserver):
  if forkserver is None:
    pytest.skip("KSTORE_TEST_FORKSERVER=0")


def test_forked_child_has_the_requesters_stdio_cwd_environment_and_cores(server, tmp_path):
  cores = sorted(os.sched_getaffinity(0))[-1:] if shutil.which("taskset") else sorted(
      os.sched_getaffinity(0))
  env = runs.env(tmp_path / "cache", n_devices=2)
  proc = _probe(tmp_path, "report", "x y", env=env, stdin=subprocess.PIPE,
                pin=["taskset", "-c", str(cores[0])] if len(cores) == 1 else [])
  out, err = proc.communicate("from stdin", timeout=60)
  assert proc.returncode == 3, err
  got = json.loads(out)
  assert got == {"preloaded": True, "argv": ["report", "x y"], "cwd": str(tmp_path),
                 "xla_flags": env["XLA_FLAGS"], "stdin": "from stdin", "affinity": cores,
                 "cache": str(tmp_path / "cache")}
  # an environment the preloaded modules would have read otherwise: the interpreter itself
  proc = _probe(tmp_path, "report", env={**env, "JAX_ENABLE_X64": "1"})
  out, _ = proc.communicate(timeout=60)
  assert json.loads(out)["preloaded"] is False


def test_forked_child_gets_the_clients_signals_and_gives_its_status(server, tmp_path):
  pid_file = tmp_path / "pid"
  proc = _probe(tmp_path, "wait", str(pid_file))
  child = _wait_for(pid_file)
  assert child != proc.pid
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert (proc.returncode, out) == (5, "got SIGTERM\n")
  proc = _probe(tmp_path, "die")
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL   # killed by a signal: the client by the same one
  proc = _probe(tmp_path, "raise")
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 1 and err.rstrip().endswith("ValueError: uncaught"), err


def test_client_killed_takes_its_child_along(server, tmp_path):
  pid_file = tmp_path / "pid"
  proc = _probe(tmp_path, "wait", str(pid_file))
  child = _wait_for(pid_file)
  proc.kill()
  proc.wait(timeout=60)
  deadline = time.time() + 10
  while time.time() < deadline and os.path.exists(f"/proc/{child}"):
    time.sleep(0.05)
  assert not os.path.exists(f"/proc/{child}"), "the child outlived its client"
