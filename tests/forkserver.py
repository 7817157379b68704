"""A fork server for the suite's `python -m kstore_jax.<tool>` subprocesses.

Every tool process of the suite spent ~1.4 CPU-s importing jax, flax, optax, orbax, grain,
tensorboardX and the library before doing anything (BENCHMARKS.md, session 30): a fifth of the
default suite's CPU over ~150 processes. The server imports all that once, before any JAX
backend exists, and forks a child per request; the child takes the requester's stdio, working
directory, CPU affinity and environment and runs the module as `python -m` would.

    python tests/forkserver.py --serve NAME      the server (conftest starts one per pytest
                                                 process; it ends when its stdin closes)
    python -I -S tests/forkserver.py NAME ARGS   a client: ARGS as for python. `-m MODULE ...`
                                                 runs in a forked child; anything else, or an
                                                 environment the preloaded modules would have
                                                 read differently, execs the real interpreter

The client is the process the test sees: it forwards SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 to
the child and exits with the child's status (the child's signal, if one killed it); if the
client dies (kill -9, a timeout), the server kills the child. What a fork cannot give, and so
what a test that needs it must not ask of this server (runs.python(fresh=True)): a child that
is gone the instant its `Popen` is reaped after SIGKILL (the server kills it a moment later:
a rerun could still find the workdir locked), a hash seed and NumPy global random state of its
own, modules not yet imported, and an interpreter started by the OS (`cli.started_as_program`).
Only the standard library is imported at module level: the client runs with `python -I -S`.
"""

import json
import os
import select
import signal
import socket
import struct
import sys

# Environment variables read when a process runs, not when the preloaded modules are imported:
# a request may differ from the server's environment in these and still be forked. Not the
# cluster's (runs.CLUSTER_VARS): the processes of one jax.distributed cluster start as the OS
# starts them, each with a hash seed of its own, as a real cluster's do (an order that depends
# on it then shows as the processes disagreeing).
READ_AT_RUN = ("XLA_FLAGS", "KSTORE_TOKENIZER_CACHE", "KSTORE_GRID_CORE", "KSTORE_GRID_PARENT",
               "COLUMNS", "LINES",
               # (the suite's own, and launch/device_check.sh's and its shell's)
               "PYTEST_CURRENT_TEST", "KSTORE_TEST_PYTHON", "KSTORE_CHECK_SECONDS",
               "KSTORE_NO_WHEELS", "PYTHON", "PWD", "OLDPWD", "SHLVL", "_", "PS1",
               # (set by jax's Mosaic GPU when imported, and read by it alone: not preloaded)
               "MOSAIC_GPU_CUDA_ROOT")
# ...and those the child applies itself after the fork: jax's compilation-cache settings
# and platforms (read into jax.config when jax is imported: the child sets its own value, or
# jax's default where its environment has none) and PYTHONUNBUFFERED (read at start-up).
# JAX_PLATFORMS is also read by the library's import (heap.cpu_only: whether to retain freed
# memory): a request may differ in it only where that answer is the same.
APPLIED = {"JAX_PLATFORMS": ("jax_platforms", str),
           "JAX_COMPILATION_CACHE_DIR": ("jax_compilation_cache_dir", str),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS":
               ("jax_persistent_cache_min_compile_time_secs", float),
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES":
               ("jax_persistent_cache_min_entry_size_bytes", int)}
UNBUFFERED = "PYTHONUNBUFFERED"
# Modules the children import anyway (none defines an absl flag: each tool module does, and
# two of them in one process would clash).
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain",
           "tensorboardX", "tokenizers", "ml_collections", "absl.app", "absl.flags",
           "kstore_jax.configlib", "kstore_jax.experiment", "kstore_jax.train.loop",
           "kstore_jax.train.checkpoint", "kstore_jax.train.metrics", "kstore_jax.eval.qa_eval",
           "kstore_jax.data.pipeline", "kstore_jax.tools.cli", "kstore_jax.tools.runtime")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_LEN = struct.Struct("!I")


def address(name: str) -> str:
  """The server's socket: Linux's abstract namespace (no file to clean up)."""
  return "\0" + name


def _send(sock, obj, fds=()) -> None:
  data = json.dumps(obj).encode()
  msg = _LEN.pack(len(data)) + data
  if fds:
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i",
                                                                            *fds))])
  else:
    sock.sendall(msg)


def _recv(sock, want_fds: int = 0):
  """(the next message, the file descriptors that came with it); (None, []) at EOF."""
  fds = []
  head = b""
  while len(head) < _LEN.size:
    if want_fds and not fds:
      chunk, anc, _, _ = sock.recvmsg(_LEN.size - len(head),
                                      socket.CMSG_SPACE(want_fds * struct.calcsize("i")))
      for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
          fds += struct.unpack(f"{len(data) // struct.calcsize('i')}i", data)
    else:
      chunk = sock.recv(_LEN.size - len(head))
    if not chunk:
      return None, fds
    head += chunk
  (n,) = _LEN.unpack(head)
  body = b""
  while len(body) < n:
    chunk = sock.recv(n - len(body))
    if not chunk:
      return None, fds
    body += chunk
  return json.loads(body), fds


# ---------------------------------------------------------------------------------- client

def client(name: str, args: list[str]) -> None:
  """Run `python ARGS` through the server `name`, or exec the interpreter where it cannot."""
  real = [sys.executable, *args]
  if len(args) < 2 or args[0] != "-m":
    os.execv(sys.executable, real)
  sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  try:
    sock.connect(address(name))
  except OSError:   # no server (it ended, or never started): the interpreter itself
    sock.close()
    os.execv(sys.executable, real)
  pending, child = [], [None]

  def forward(sig, _frame):
    if child[0] is None:
      pending.append(sig)
    else:
      os.kill(child[0], sig)
  for sig in FORWARDED:
    signal.signal(sig, forward)
  _send(sock, {"module": args[1], "argv": args[2:], "env": dict(os.environ),
               "cwd": os.getcwd(), "affinity": sorted(os.sched_getaffinity(0))}, fds=(0, 1, 2))
  reply, _ = _recv(sock)
  if reply is None or "fallback" in reply:
    sock.close()
    if reply and os.environ.get("KSTORE_TEST_FORKSERVER_LOG"):
      with open(os.environ["KSTORE_TEST_FORKSERVER_LOG"], "a") as f:
        f.write(json.dumps({"argv": args, "fallback": reply["fallback"]}) + "\n")
    os.execv(sys.executable, real)
  child[0] = reply["pid"]
  for sig in pending:
    os.kill(child[0], sig)
  done, _ = _recv(sock)
  if done is None:
    sys.stderr.write(f"forkserver: the server went away while running {args}\n")
    os._exit(1)
  status = done["status"]
  if os.WIFSIGNALED(status):   # the same end: by the signal that ended the child
    sig = os.WTERMSIG(status)
    if sig != signal.SIGKILL and sig != signal.SIGSTOP:   # (whose handling cannot change)
      signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
  os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


# ---------------------------------------------------------------------------------- server

def why_not(env: dict, base: dict, imported: dict) -> str | None:
  """Why a request with environment `env` cannot be forked from a server started with `base`
  whose imports set `imported` (the variables that differ and are read at start-up or
  import), or None."""
  differ = [key for key in sorted(set(env) | set(base))
            if env.get(key) != base.get(key) and key not in READ_AT_RUN and key not in APPLIED
            and not (key == UNBUFFERED and key in env)   # (an unbuffered server: nothing to undo)
            and not (key in imported and env.get(key) in (None, imported[key]))]
  if _cpu_only(env) != _cpu_only(base):
    differ.append("JAX_PLATFORMS")
  if "PYTHONPATH" in differ and _same_code(env) and _same_code(base):
    differ.remove("PYTHONPATH")
  return f"{', '.join(differ)} differ" if differ else None


def _reply(conn, obj) -> None:
  """_send to a client that may be gone (killed): the server goes on."""
  try:
    _send(conn, obj)
  except OSError:
    pass


def _cpu_only(env: dict) -> bool:
  """heap.cpu_only's answer (read by `import kstore_jax`) in environment `env`."""
  from kstore_jax import heap   # pylint: disable=import-outside-toplevel
  saved = os.environ.pop("JAX_PLATFORMS", None)
  if "JAX_PLATFORMS" in env:
    os.environ["JAX_PLATFORMS"] = env["JAX_PLATFORMS"]
  try:
    return heap.cpu_only()
  finally:
    os.environ.pop("JAX_PLATFORMS", None)
    if saved is not None:
      os.environ["JAX_PLATFORMS"] = saved


def _same_code(env: dict) -> bool:
  """Whether `env`'s PYTHONPATH puts nothing on sys.path but this checkout, whose kstore_jax
  the server has imported (launch/_device_env.sh puts it there), and entries already on it."""
  import kstore_jax   # pylint: disable=import-outside-toplevel
  known = {os.path.realpath(p) for p in (*sys.path, os.path.dirname(os.path.dirname(
      kstore_jax.__file__)))}
  return all(os.path.realpath(p) in known
             for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)


def serve(name: str) -> None:
  """Import PRELOAD, then fork a child per request until stdin closes."""
  import importlib
  base = dict(os.environ)
  for var in APPLIED:   # jax imported without them: their defaults, for a child without them
    os.environ.pop(var, None)
  import jax   # pylint: disable=import-outside-toplevel
  defaults = {option: getattr(jax.config, option) for option, _ in APPLIED.values()}
  os.environ.update(base)
  for mod in PRELOAD:
    importlib.import_module(mod)
  # what the imports set where it was unset (tensorboardX: CRC32C_SW_MODE=auto): a requester
  # that imported them too has it, one that did not gets it in the child, as its imports would
  imported = {k: v for k, v in os.environ.items() if k not in base}
  from jax._src import xla_bridge   # pylint: disable=import-outside-toplevel
  assert not xla_bridge._backends, "a preloaded module started a JAX backend"   # pylint: disable=protected-access
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(address(name))
  listener.listen(64)
  wake_r, wake_w = os.pipe()
  os.set_blocking(wake_w, False)
  signal.set_wakeup_fd(wake_w)
  signal.signal(signal.SIGCHLD, lambda *_: None)
  print("ready", flush=True)
  children = {}   # pid -> the client's connection (None once the client is gone)
  while True:
    conns = {c.fileno(): pid for pid, c in children.items() if c is not None}
    ready, _, _ = select.select([listener, sys.stdin, wake_r, *conns], [], [])
    if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1 << 16):
      for pid in children:
        os.kill(pid, signal.SIGKILL)
      return
    if wake_r in ready:
      os.read(wake_r, 1 << 16)
    for fd in set(ready) & set(conns):   # a client went away (kill -9, a timeout): its child too
      os.kill(conns[fd], signal.SIGKILL)
      children[conns[fd]].close()
      children[conns[fd]] = None
    while children:   # every child that ended: its status to its client
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if not pid:
        break
      conn = children.pop(pid, None)
      if conn is not None:
        _reply(conn, {"status": status})
        conn.close()
    if listener in ready:
      conn, _ = listener.accept()
      try:
        request, fds = _recv(conn, want_fds=3)
      except OSError:   # (the client killed while it asked)
        request, fds = None, []
      reason = ("bad request" if request is None or len(fds) != 3
                else why_not(request["env"], base, imported))
      if reason:
        _reply(conn, {"fallback": reason})
        conn.close()
      else:
        pid = os.fork()
        if pid == 0:
          listener.close()
          for c in children.values():
            if c is not None:
              c.close()
          conn.close()
          os.close(wake_r)
          os.close(wake_w)
          _child(request, fds, defaults, imported)   # does not return
        _reply(conn, {"pid": pid})   # (a client gone meanwhile: its EOF kills the child)
        children[pid] = conn
      for fd in fds:
        os.close(fd)


def _child(request: dict, fds, defaults: dict, imported: dict) -> None:
  """In the forked child: the requester's process, then `python -m module argv...`."""
  import runpy
  signal.set_wakeup_fd(-1)
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  for sig in FORWARDED:
    signal.signal(sig, signal.SIG_DFL)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  for i, fd in enumerate(fds):
    os.dup2(fd, i)
    os.close(fd)
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update({**imported, **request["env"]})
  os.sched_setaffinity(0, request["affinity"])
  import jax   # pylint: disable=import-outside-toplevel
  for var, (option, kind) in APPLIED.items():
    value = os.environ.get(var)
    jax.config.update(option, defaults[option] if value is None else kind(value))
  if os.environ.get(UNBUFFERED):
    import io   # pylint: disable=import-outside-toplevel
    for fd, stream in ((1, "stdout"), (2, "stderr")):
      old = getattr(sys, stream)
      setattr(sys, stream, io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False),  # pylint: disable=consider-using-with
                                            encoding=old.encoding, errors=old.errors,
                                            write_through=True))
  for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):   # (_same_code)
    if entry and entry not in sys.path:
      sys.path.insert(1, entry)
  sys.argv = ["-m", *request["argv"]]
  sys.orig_argv = [sys.executable, "-m", request["module"], *request["argv"]]   # (a re-exec's)
  sys.path[0] = os.getcwd()
  from kstore_jax.tools import cli   # pylint: disable=import-outside-toplevel
  code = 0
  try:
    runpy._run_module_as_main(request["module"])   # pylint: disable=protected-access
  except SystemExit as e:
    code = e.code
  except KeyboardInterrupt:   # as the interpreter ends on an uncaught Ctrl-C: by SIGINT
    sys.excepthook(*sys.exc_info())
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
  except BaseException:   # pylint: disable=broad-except
    sys.excepthook(*sys.exc_info())   # the traceback, as the interpreter prints it
    code = 1
  cli.exit_without_teardown(code)


if __name__ == "__main__":
  if sys.argv[1] == "--serve":
    serve(sys.argv[2])
  else:
    client(sys.argv[1], sys.argv[2:])
