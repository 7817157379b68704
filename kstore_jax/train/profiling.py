"""A jax.profiler trace of a window of training steps (`train.profile_steps = "START,STOP"`).

    profiler = StepProfiler(stage_dir, cfg.train.profile_steps)   # '' = off: every call a no-op
    with profiler:                      # leaving stops a trace still running (error, SIGTERM)
      for step in range(start, steps):
        profiler.step(step, pending)    # before running `step`; pending: the last step's outputs
        pending = train_step(...)

The trace covers steps START .. STOP - 1 (a resume inside the window traces from the resumed
step on) and lands in `<stage>/profile/plugins/profile/<run>/` (`*.xplane.pb`, `*.trace.json.gz`):
open it with TensorBoard's profile plugin (`tensorboard --logdir <stage>/profile`) or drop the
`.trace.json.gz` on https://ui.perfetto.dev.
"""

import collections
import glob
import gzip
import json
import os
import re

import jax

from kstore_jax import rundir
from kstore_jax.train.step import SCOPES


def parse_steps(text: str) -> tuple[int, int] | None:
  """"START,STOP" -> (START, STOP) with 0 <= START < STOP; '' -> None (ValueError otherwise)."""
  if not text.strip():
    return None
  parts = text.split(",")
  try:
    start, stop = (int(p) for p in parts)
  except ValueError:
    raise ValueError("expected 'START,STOP' (two step numbers) or '' (off)") from None
  if not 0 <= start < stop:
    raise ValueError(f"expected 0 <= START < STOP, got {start},{stop}")
  return start, stop


def trace_dir(stage_dir: str, process_index: int, process_count: int) -> str:
  """Where a process writes its trace: `<stage>/profile`, `<stage>/profile/process_<i>` when
  there are several (jax names a trace by host and second: processes of one host stopping in
  the same second overwrote each other's)."""
  base = os.path.join(stage_dir, rundir.PROFILE)
  return base if process_count == 1 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
  """Starts `jax.profiler.start_trace` (into `trace_dir`) at step START, stops it at STOP."""

  def __init__(self, stage_dir: str, profile_steps: str):
    self.window = parse_steps(profile_steps)
    self.log_dir = trace_dir(stage_dir, jax.process_index(), jax.process_count())
    self.active = False

  def step(self, step: int, pending=None) -> None:
    """Call before running `step`. Starts the trace when step is in [START, STOP); stops it at
    the first step >= STOP after waiting for `pending` (the traced steps' outputs, so their
    device work is inside the trace)."""
    if self.window is None:
      return
    start, stop = self.window
    if not self.active and start <= step < stop:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    elif self.active and step >= stop:
      self.stop(pending)

  def stop(self, pending=None) -> None:
    """Stop a running trace (after waiting for `pending`); nothing when none runs."""
    if self.active:
      jax.block_until_ready(pending)
      jax.profiler.stop_trace()
      self.active = False

  def __enter__(self) -> "StepProfiler":
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def op_key(name: str) -> str:
  """An HLO instruction's name as GPU kernels and trace events spell it, the key of every
  per-op table here (`fusion.12` runs as `fusion_12`)."""
  return name.replace(".", "_")


def hlo_sources(text: str) -> dict[str, str]:
  """Instruction name -> the jax code it came from (its `op_name` metadata: jit, transforms and
  Flax module path, e.g. `jit(train_step)/transpose(jvp(Transformer))/block1/attn/query/...`),
  from an optimised HLO module's text. Names are keyed with `.` as `_`, as GPU kernels and
  trace events spell them (`fusion.12` runs as `fusion_12`). Control flow (while, conditional,
  call) is left out: its span holds its body's ops, which are named themselves."""
  found = re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*?)metadata=\{[^}]*?op_name="([^"]+)"',
                     text, re.M)
  return {op_key(name): op for name, head, op in found
          if not re.search(r"\s(?:while|conditional|call)\(", head)}


# what an instruction does, by the opcodes it runs (a fusion: those of the computations it
# calls); the first kind that matches wins
KINDS = (("matmul", {"dot", "convolution"}),
         ("scatter/gather", {"scatter", "gather", "dynamic-update-slice"}),
         ("collective", {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                         "collective-permute", "all-reduce-start", "all-gather-start",
                         "collective-permute-start"}),
         ("reduction", {"reduce", "reduce-window", "select-and-scatter", "sort"}),
         ("copy/transpose", {"copy", "transpose", "copy-start"}))
# a computation's head (`ENTRY` marks the entry) and an instruction: name = shape (a tuple
# `(...)` or one array) opcode(operands), attributes
_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([a-z][\w\-]*)\((.*)$")


def hlo_computations(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
  """An optimised HLO module's computations, {name: [(instruction, shape, opcode, the rest of
  its line)]}, and the entry's name (None without one). A computation ends at a line that is
  `}` alone (a TPU kernel's config may hold a line starting with one)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    head = _HEAD.match(line)
    if head:
      current = comps.setdefault(head.group(2), [])
      entry = head.group(2) if head.group(1) else entry
    elif line.rstrip() == "}":
      current = None
    elif current is not None and (m := _INSTRUCTION.match(line)):
      current.append(m.groups())
  return comps, entry


def custom_call_kind(target: str) -> str:
  """The kind of a custom call or custom fusion by its target: a cuBLAS/cuDNN GEMM or XLA's
  Triton GEMM is `matmul`; a Pallas/Triton kernel or cuDNN's fused attention, `kernel
  (<target>)` (on a GPU, the attention kernels)."""
  t = target.lower()
  if "gemm" in t or "matmul" in t:
    return "matmul"
  return f"kernel ({target})"


def hlo_kinds(text: str) -> dict[str, str]:
  """Instruction name (keyed as hlo_sources keys it) -> what it does, from an optimised HLO
  module's text: `matmul` (dots, GEMM custom calls and fusions, on any backend), `kernel (...)`
  (Pallas/Triton custom calls: the attention), `scatter/gather`, `collective`, `reduction`,
  `copy/transpose`, else `elementwise` (a fusion of element-wise ops or one such op). A fusion
  is of the kind of the ops in the computations it calls."""
  bodies, _ = hlo_computations(text)
  cache: dict[str, set] = {}

  def opcodes(comp: str) -> set:
    """Every opcode a computation runs, through the computations it calls."""
    if comp not in cache:
      cache[comp] = set()
      for _, _, op, rest in bodies.get(comp, []):
        cache[comp].add(op)
        for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
          cache[comp] |= opcodes(callee)
    return cache[comp]

  def kind(op: str, rest: str) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    if op == "custom-call" and target:
      return custom_call_kind(target.group(1))
    custom = re.search(r'"kind":"(__[^"]+)"', rest)   # a custom fusion's backend (GPU, CPU)
    if op == "fusion" and custom and ("gemm" in custom.group(1) or "cudnn" in custom.group(1)):
      return custom_call_kind(custom.group(1))
    ops = {op}
    if op == "fusion":
      ops = set().union(*(opcodes(c) for c in re.findall(r"calls=%?([\w.\-]+)", rest)))
    return next((k for k, members in KINDS if ops & members), "elementwise")

  return {op_key(name): kind(op, rest)
          for instrs in bodies.values() for name, _, op, rest in instrs}


def scope_of(op_name: str) -> str:
  """A step's part from an op's jax name: the model's module path without the layer index
  (`block*/attn/query`, `block*/mlp/up`, `ln_f`), or the train step's own parts outside the
  model (`step/head_loss`, `step/optimizer`, `step/metrics`: train/step.py's SCOPES; `step`:
  anything else)."""
  # each part without its transformation wrappers: transpose(jvp(Transformer)) -> Transformer
  parts = [re.sub(r"^(?:[\w.]+\()+([^()]*)\)+$", r"\1", p)
           for p in op_name.split(";")[0].split("/") if not p.startswith("jit(")]
  parts = [p for p in parts if p]
  if not parts or parts[0] != "Transformer":
    return next((f"step/{p}" for p in parts if p in SCOPES), "step")
  path = [re.sub(r"^block\d+$", "block*", p) for p in parts[1:-1]]   # the last: the primitive
  return "/".join(path[:3]) or "model"


def trace_op_times(trace_dir: str, sources: dict[str, str] | None = None) -> tuple[dict, str]:
  """Total µs per op name over a `jax.profiler` Perfetto trace, of the device's tracks (GPU or
  TPU) where there are some, else of the host's: there, with `sources` (hlo_sources of the
  traced step), only the step's own HLO ops (not the Python and runtime spans around them).
  A kernel whose event names its HLO op (`hlo_op`, e.g. a cuBLAS GEMM) is counted under that
  op's name. Returns the totals and which tracks."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in procs.items() if "GPU" in n or "TPU" in n}
  where = "device" if device else "host"
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or (device and e["pid"] not in device):
      continue
    name = op_key(str((e.get("args") or {}).get("hlo_op") or e["name"]))
    if device or not sources or name in sources:
      totals[name] += e.get("dur", 0)
  return dict(totals), where
