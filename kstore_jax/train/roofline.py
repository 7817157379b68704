"""A compiled step's floor, read from its optimised HLO: every kernel it launches, the bytes
at each kernel's edges and the matrix FLOPs inside it, each kernel's time at the ceilings
(max(FLOPs / matmul rate, bytes / memory bandwidth)) summed one after another, as a GPU
stream runs them. No jax: text in, numbers out (`bench roofline` compiles the step for a
GPU on a host without one, train/aot.py, and prints these).

What the bytes count: each kernel's operands and results as whole buffers, read once and
written once. That over-counts a kernel that reads a slice of a buffer or updates one in
place (dynamic-update-slice) and under-counts one that re-reads its inputs (a GEMM's tiles,
served from L2 at these sizes, are not counted again); a cuBLAS GEMM (a custom call) counts by
its backend config's dimensions, without its workspace; a Pallas kernel's FLOPs are its own
(not in the HLO): it counts by its bytes alone, so its floor is a lower bound that its
measured time (`bench attention`) replaces."""

import dataclasses
import math
import re

from kstore_jax.train import profiling

# an array type: pred or a letter kind with its bits (s4, bf16, f8e4m3fn, c64), and its dims
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]")


# instructions that launch nothing: views, tuples and bookkeeping
NO_KERNEL = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all",
             "opt-barrier", "partition-id", "replica-id", "add-dependency"}


def dtype_bytes(dtype: str) -> float:
  """Bytes of one element: pred 1, else its bits / 8 (bf16: 2, f8e4m3fn: 1, s4: 0.5)."""
  return 1 if dtype == "pred" else int(re.match(r"[a-z]+?(\d+)", dtype).group(1)) / 8


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape (a tuple's elements summed)."""
  return int(sum(math.prod(int(d) for d in dims.split(",") if d) * dtype_bytes(dt)
                 for dt, dims in _ARRAY.findall(shape)))


TINY_BYTES = 1_000_000


@dataclasses.dataclass
class Kernel:
  """One launched kernel: its HLO instruction, what it does (profiling.hlo_kinds), the bytes
  at its edges and its matrix FLOPs (each times `runs`: a loop body's trip count)."""
  name: str
  kind: str
  bytes: int
  flops: int
  source: str
  runs: int = 1

  def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
    return self.runs * max(self.flops / flops_per_s, self.bytes / bytes_per_s)

  @property
  def tiny(self) -> bool:
    """Launch-bound: under TINY_BYTES at its edges (~0.2 us at an H200's 4.3 TB/s, against
    ~2-3 us a launch even in XLA's command buffers)."""
    return self.bytes < TINY_BYTES


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (its text after the opcode's parenthesis)."""
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      end = i
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _dims(shape: str) -> list[int]:
  return [int(d) for d in _ARRAY.search(shape).group(2).split(",") if d]


def _dot(shape: str, rest: str, shapes: dict) -> int:
  """FLOPs of one dot or convolution (2 per multiply-add): a dot's result elements x its
  contracted size; a convolution's (a TPU's matmul is one, `dim_labels=bf_io->bf`)
  `_conv_macs`."""
  lhs = _dims(shapes[_operands(rest)[0]])
  if labels := re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest):
    return 2 * _conv_macs(labels.groups(), lhs, _dims(shape), rest)
  dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  return 2 * math.prod(_dims(shape)) * (
      math.prod(lhs[int(i)] for i in dims.group(1).split(",") if i) if dims else 1)


def _conv_macs(labels: tuple[str, str, str], lhs: list[int], out: list[int], rest: str) -> int:
  """Multiply-adds of a convolution that touch real input (not its padding): the output's
  batch and feature elements x, per spatial dim, the window taps over the input summed over
  the output positions (stride from `window=`) x the input features a group sums. TPU
  compilers write matmuls as convolutions, some with a padded window (a 1 x 8 window over a
  size-1 dim padded 7 both sides: 1 real tap in 8)."""
  lhs_l, _, out_l = labels
  spatial = [c for c in lhs_l if c.isdigit()]
  window = re.search(r"window=\{([^}]*)\}", rest)

  def field(key: str, default):
    """A `window=` field per spatial dim (`size=1x8`, `pad=0_0x7_7`), or its default."""
    m = window and re.search(rf"\b{key}=([\dx_]+)", window.group(1))
    if not m:
      return [default] * len(spatial)
    return [tuple(int(v) for v in part.split("_")) if "_" in part else int(part)
            for part in m.group(1).split("x")]

  sizes, pads, strides = field("size", 1), field("pad", (0, 0)), field("stride", 1)
  taps = 1
  for d, w, (lo, _), st in zip(sorted(spatial), sizes, pads, strides):
    n, outs = lhs[lhs_l.index(d)], out[out_l.index(d)]
    taps *= sum(max(0, min(j * st - lo + w, n) - max(j * st - lo, 0)) for j in range(outs))
  nonspatial = math.prod(n for c, n in zip(out_l, out) if not c.isdigit())
  groups = re.search(r"feature_group_count=(\d+)", rest)
  return nonspatial * taps * lhs[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1)


def _gemm_call(shape: str, rest: str, shapes: dict) -> tuple[int, int]:
  """A cuBLAS GEMM custom call's (FLOPs, workspace bytes): its first result's elements x the
  contracted size of its first operand (`gemm_backend_config`'s dimension numbers), and its
  scratch result (the s8 workspace, the tuple's last element: not traffic). (0, 0) for any
  other custom call."""
  config = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
  if '"gemm_backend_config"' not in rest or not config:
    return 0, 0
  lhs = _dims(shapes[_operands(rest)[0]])
  arrays = _ARRAY.findall(shape)
  contracted = math.prod(lhs[int(i)] for i in re.findall(r"\d+", config.group(1)))
  out = math.prod(int(d) for d in arrays[0][1].split(",") if d)
  scratch = array_bytes(f"{arrays[-1][0]}[{arrays[-1][1]}]") if (
      len(arrays) > 1 and arrays[-1][0] == "s8") else 0
  return 2 * out * contracted, scratch


def _dot_flops(comps: dict, comp: str, seen=None) -> int:
  """FLOPs of the dots in a computation and in those it calls."""
  seen = set() if seen is None else seen
  if comp in seen:
    return 0
  seen.add(comp)
  instrs = comps.get(comp, [])
  shapes = {name: shape for name, shape, _, _ in instrs}
  flops = 0
  for _, shape, op, rest in instrs:
    if op in ("dot", "convolution"):
      flops += _dot(shape, rest, shapes)
    for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
      flops += _dot_flops(comps, callee, seen)
  return flops


def kernels(text: str) -> list[Kernel]:
  """Every kernel the module's entry computation launches, a while loop's body's kernels with
  its known trip count (1 where the HLO names none), in program order."""
  comps, entry = profiling.hlo_computations(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  kinds, sources = profiling.hlo_kinds(text), profiling.hlo_sources(text)
  out: list[Kernel] = []

  def walk(comp: str, runs: int) -> None:
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    for name, shape, op, rest in comps[comp]:
      if op in NO_KERNEL or op.endswith("-done"):   # an async pair counts at its start
        continue
      if op in ("while", "call", "conditional"):
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
        n = runs * (int(trips.group(1)) if trips and op == "while" else 1)
        for callee in re.findall(r"(?:body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)",
                                 rest):
          walk(callee, n)
        continue
      read = sum(array_bytes(shapes.get(o, "")) for o in _operands(rest))
      flops = sum(_dot_flops(comps, c) for c in re.findall(r"calls=%?([\w.\-]+)", rest))
      if op in ("dot", "convolution"):
        flops += _dot(shape, rest, shapes)
      gemm_flops, scratch = _gemm_call(shape, rest, shapes) if op == "custom-call" else (0, 0)
      key = profiling.op_key(name)
      out.append(Kernel(name, kinds.get(key, "elementwise"),
                        read + array_bytes(shape) - scratch, flops + gemm_flops,
                        sources.get(key, ""), runs))

  walk(entry, 1)
  return out


def summary(ks: list[Kernel], flops_per_s: float, bytes_per_s: float, key) -> dict:
  """{key(kernel): (kernels, bytes, FLOPs, floor s)} summed over `ks`."""
  out: dict = {}
  for k in ks:
    n, b, f, t = out.get(key(k), (0, 0, 0, 0.0))
    out[key(k)] = (n + k.runs, b + k.runs * k.bytes, f + k.runs * k.flops,
                   t + k.floor_s(flops_per_s, bytes_per_s))
  return out


def scope(k: Kernel) -> str:
  """The step's part a kernel belongs to (profiling.scope_of its jax op name)."""
  return profiling.scope_of(k.source) if k.source else "unknown"
