"""Inspect a run directory: stages, saved steps, config, checkpoint contents, data state.

    python -m kstore_jax.inspect --workdir=runs/tiny/single [--stage=pretrain] [--step=N|final]
        [--json] [--norestore]

Lists the stages present (saved checkpoint steps, whether `final/` exists, the last metrics
line), the keys of results.json under the stage that produced each (its `produced_by` map;
a key's `<key>_ci` sibling shown as its mean's 95% interval beside it), the config, and for one checkpoint (default: the newest step of `--stage`): the
parameter tree (path, shape, dtype, the sharding it was saved with), parameter counts per
top-level module, an optimizer-state summary, the training step, and the Grain iterator state
saved next to it. Shapes, dtypes and shardings come from orbax metadata (no model is built);
the arrays are then restored onto one CPU device to check that the step is readable (skip with
`--norestore`). `--json` prints one JSON object instead of the text report.

Read-only: it takes no lock and writes nothing. Errors (missing workdir, stage or step, an
unreadable checkpoint) are one line on stderr, exit status 2.
"""

import json
import os
import sys
import tempfile

from absl import flags, logging

from configs.base import STAGE_NAMES, TRAINED_STAGES
from kstore_jax import rundir
from kstore_jax.configlib import ConfigError
from kstore_jax.rundir import CI, PRODUCED_BY
from kstore_jax.tools import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (as given to kstore_jax.main).")
_STAGE = flags.DEFINE_string("stage", None, "Stage to inspect (default: pretrain, else the "
                             "first stage present).")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step to inspect, or 'final' for the "
                            "stage's final/ params (default: the newest saved step).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the text report.")
_RESTORE = flags.DEFINE_bool("restore", True, "Restore the arrays (on one CPU device) to check "
                             "that the checkpoint is readable; --norestore reads metadata only.")


# -- the workdir ----------------------------------------------------------------------------
def _read_json(path: str, what: str) -> dict:
  """The JSON object in `path`; ConfigError naming it where it cannot be read (or, from
  rundir.read_json, holds no JSON object)."""
  try:
    return rundir.read_json(path)
  except OSError as e:
    raise ConfigError(f"{what} {path} is unreadable ({type(e).__name__}: "
                      f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  line = lines[0] if lines else type(e).__name__
  return line.split(" See full TensorStore details")[0][:300]


def last_metrics_line(stage_dir: str):
  """The last complete row of the stage's metrics.jsonl (a line cut short by a kill is
  skipped); None when there is none."""
  rows = rundir.read_metrics(rundir.metrics_file(stage_dir))
  return rows[-1] if rows else None


def saved_steps(ckpt_dir: str) -> tuple[list[int], list[str]]:
  """(finished integer steps, other entries: unfinished tmp dirs, set-aside unreadable steps)."""
  steps, other = [], []
  if not os.path.isdir(ckpt_dir):
    return steps, other
  for name in os.listdir(ckpt_dir):
    if not os.path.isdir(os.path.join(ckpt_dir, name)):
      continue
    if name.isdigit():
      steps.append(int(name))
    else:
      other.append(name)
  return sorted(steps), sorted(other)


def stage_summary(workdir: str) -> dict:
  out = {}
  for stage in TRAINED_STAGES:
    d = rundir.stage_dir(workdir, stage)
    if not os.path.isdir(d):
      continue
    steps, other = saved_steps(rundir.checkpoints_dir(d))
    out[stage] = {"steps": steps, "final": rundir.is_done(d),
                  "other_checkpoint_entries": other, "last_metrics": last_metrics_line(d)}
  return out


# -- checkpoints ----------------------------------------------------------------------------
def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path)


def _spec_str(spec) -> str:
  parts = []
  for p in spec:
    if p is None:
      parts.append("-")
    elif isinstance(p, (tuple, list)):
      parts.append("+".join(str(x) for x in p) if p else "-")
    else:
      parts.append(str(p))
  return "P(" + ", ".join(parts) + ")"


def _sharding_info(meta) -> tuple[str, dict | None]:
  """(partition spec string, {axis: size} of the saved mesh) from orbax sharding metadata."""
  sh = getattr(meta, "sharding", None)
  if sh is None:
    return "-", None
  spec = getattr(sh, "partition_spec", None)
  names = getattr(sh, "axis_names", None)
  shape = getattr(sh, "shape", None)
  mesh = ({str(n): int(s) for n, s in zip(names, shape)}
          if names is not None and shape is not None else None)
  if spec is None:
    return type(sh).__name__, mesh
  return _spec_str(spec), mesh


def _leaf_rows(tree, prefix=()):
  import jax
  import numpy as np
  rows = []
  for path, meta in jax.tree_util.tree_leaves_with_path(tree):
    shape = tuple(int(s) for s in meta.shape)
    dtype = np.dtype(meta.dtype)
    spec, mesh = _sharding_info(meta)
    rows.append({"path": _path_str(prefix + tuple(path)), "shape": list(shape),
                 "dtype": dtype.name, "size": int(np.prod(shape, dtype=np.int64)),
                 "bytes": int(np.prod(shape, dtype=np.int64)) * dtype.itemsize,
                 "sharding": spec, "_mesh": mesh})
  return rows


def _read_metadata(item_dir: str, what: str):
  import orbax.checkpoint as ocp
  if not os.path.isdir(item_dir):
    raise ConfigError(f"{what}: missing {item_dir}")
  try:
    ckptr = ocp.StandardCheckpointer()
    try:
      md = ckptr.metadata(item_dir)
    finally:
      ckptr.close()
    return getattr(md, "item_metadata", md)
  except ConfigError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise ConfigError(f"{what} is unreadable: {item_dir} ({type(e).__name__}: "
                      f"{_first_line(e)})") from None


def _restore(item_dir: str, metadata, what: str):
  """Restore every array onto one local device (verifies that the data files are readable)."""
  import jax
  import orbax.checkpoint as ocp
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                        metadata)
  try:
    ckptr = ocp.StandardCheckpointer()
    try:
      return ckptr.restore(item_dir, target)
    finally:
      ckptr.close()
  except Exception as e:
    raise ConfigError(f"{what} is unreadable: {item_dir} ({type(e).__name__}: "
                      f"{_first_line(e)})") from None


def _param_counts(rows) -> dict:
  by_module: dict[str, int] = {}
  for r in rows:
    top = r["path"].split("/", 1)[0]
    by_module[top] = by_module.get(top, 0) + r["size"]
  return {"by_module": by_module, "total": sum(by_module.values())}


def _grain_state(data_dir: str, what: str) -> dict:
  """The Grain iterator state files (one JSON per process) under checkpoints/<step>/data."""
  if not os.path.isdir(data_dir):
    raise ConfigError(f"{what}: missing data iterator state {data_dir}")
  out = {}
  for name in sorted(os.listdir(data_dir)):
    if name.endswith(".json"):
      out[name[:-len(".json")]] = _read_json(os.path.join(data_dir, name),
                                             f"{what}: data iterator state")
  if not out:
    raise ConfigError(f"{what}: no data iterator state (*.json) in {data_dir}")
  return out


def inspect_checkpoint(stage_dir: str, stage: str, step, restore: bool) -> dict:
  """Metadata (and, with restore, a readability check) of one checkpoint step or final/."""
  import numpy as np
  if step == "final":
    item_dir = rundir.final_dir(stage_dir)
    what = f"{stage} final params"
    md = _read_metadata(item_dir, what)
    if md is None:
      raise ConfigError(f"{what} is unreadable: {item_dir} (its tree metadata is missing or "
                        "damaged)")
    params_md, opt_md, step_md, data = md, None, None, None
    path = item_dir
  else:
    path = os.path.join(rundir.checkpoints_dir(stage_dir), str(step))
    item_dir = os.path.join(path, rundir.STATE)
    what = f"{stage} checkpoint step {step}"
    md = _read_metadata(item_dir, what)
    if not hasattr(md, "keys"):
      raise ConfigError(f"{what} is unreadable: {item_dir} (its tree metadata is missing or "
                        "damaged)")
    params_md = md.get("params")
    opt_md, step_md = md.get("opt_state"), md.get("step")
    data = _grain_state(os.path.join(path, rundir.DATA), what)
    if params_md is None:
      raise ConfigError(f"{what}: no 'params' in {item_dir}")
  params = _leaf_rows(params_md)
  meshes = {json.dumps(r.pop("_mesh"), sort_keys=True) for r in params}
  out = {"path": path, "kind": "final" if step == "final" else "checkpoint",
         "step": None if step == "final" else int(step),
         "saved_mesh": [json.loads(m) for m in sorted(meshes) if m != "null"],
         "params": params, "param_count": _param_counts(params)}
  proc_dirs = [n for n in os.listdir(item_dir) if n.startswith("ocdbt.process_")]
  out["saved_by_processes"] = max(len(proc_dirs), 1)
  if opt_md is not None:
    opt = _leaf_rows(opt_md)
    for r in opt:
      r.pop("_mesh")
    out["opt_state"] = {"leaves": len(opt), "size": sum(r["size"] for r in opt),
                        "bytes": sum(r["bytes"] for r in opt)}
  if data is not None:
    out["data_state"] = data
  if restore:
    import jax
    restored = _restore(item_dir, md, what)
    tree = restored if step == "final" else restored["params"]
    nonfinite = 0
    for leaf in jax.tree.leaves(tree):
      a = np.asarray(leaf)
      if np.issubdtype(a.dtype, np.floating):
        nonfinite += int((~np.isfinite(a)).sum())
    out["restored"] = {"ok": True, "nonfinite_params": nonfinite,
                       "device": str(jax.local_devices()[0])}
    if step != "final":
      out["state_step"] = int(np.asarray(restored["step"]))
  elif step_md is not None:
    out["state_step"] = None   # the value needs a restore
  return out


# -- the report -------------------------------------------------------------------------------
def collect(workdir: str, stage: str | None = None, step: str | None = None,
            restore: bool = True) -> dict:
  """Everything the report shows, as one JSON-able dict."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: no such directory")
  cfg_path = os.path.join(workdir, rundir.CONFIG)
  config = _read_json(cfg_path, "config") if os.path.exists(cfg_path) else None
  stages = stage_summary(workdir)
  out = {"workdir": workdir, "config": config, "stages": stages}
  res_path = os.path.join(workdir, rundir.RESULTS)
  if os.path.exists(res_path):
    out["results"] = _read_json(res_path, "results")
    out["results_by_stage"] = results_by_stage(out["results"])
  if not stages:
    raise ConfigError(f"--workdir={workdir}: no stage directories "
                      f"({', '.join(TRAINED_STAGES)}) in it: is it a kstore_jax run?")
  chosen = stage is not None or step is not None
  if stage is None:
    stage = "pretrain" if "pretrain" in stages else next(iter(stages))
  if stage not in stages:
    raise ConfigError(f"--stage={stage}: not in {workdir} (stages present: "
                      f"{', '.join(stages)})")
  info = stages[stage]
  if step is None:
    if info["steps"]:
      step = str(info["steps"][-1])
    elif info["final"]:
      step = "final"
    elif not chosen:   # a run that has not saved yet: the rest of the report still holds
      out.update(stage=stage, checkpoint=None, last_metrics=info["last_metrics"])
      return out
    else:
      raise ConfigError(f"--stage={stage}: no checkpoint and no final/ in "
                        f"{rundir.stage_dir(workdir, stage)}")
  if step != "final":
    if not step.isdigit():
      raise ConfigError(f"--step={step}: expected a step number or 'final'")
    step = str(int(step))   # "007": the checkpoint directory is "7"
    if int(step) not in info["steps"]:
      raise ConfigError(f"--step={step}: stage {stage} has no checkpoint step {step} (saved "
                        f"steps: {', '.join(map(str, info['steps'])) or 'none'})")
  elif not info["final"]:
    raise ConfigError(f"--step=final: stage {stage} has no final/ (not finished)")
  out["stage"] = stage
  out["checkpoint"] = inspect_checkpoint(rundir.stage_dir(workdir, stage), stage, step, restore)
  out["last_metrics"] = info["last_metrics"]
  return out


def _fmt_int(n: int) -> str:
  return f"{n:,}"


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n} B"


def _checkpoint_lines(c: dict, workdir: str) -> list[str]:
  """The report's lines of one inspected checkpoint or final/ (inspect_checkpoint's dict)."""
  lines = []
  rel = os.path.relpath(c["path"], workdir)
  mesh = " | ".join(" ".join(f"{a}={n}" for a, n in m.items()) for m in c["saved_mesh"]) or "?"
  lines.append(f"checkpoint {rel} (saved on mesh {mesh}; {c['saved_by_processes']} "
               f"process{'es' if c['saved_by_processes'] > 1 else ''})")
  w = max([len(p["path"]) for p in c["params"]] + [4])
  lines.append(f"  {'path':<{w}}  {'shape':<16} {'dtype':<9} {'size':>11}  sharding (saved)")
  for p in c["params"]:
    lines.append(f"  {p['path']:<{w}}  {str(tuple(p['shape'])):<16} {p['dtype']:<9} "
                 f"{_fmt_int(p['size']):>11}  {p['sharding']}")
  pc = c["param_count"]
  lines.append("  parameters: " + ", ".join(f"{k} {_fmt_int(v)}" for k, v in
                                            pc["by_module"].items())
               + f"; total {_fmt_int(pc['total'])}")
  if "opt_state" in c:
    o = c["opt_state"]
    step = c.get("state_step")
    lines.append(f"  optimizer state: {o['leaves']} leaves, {_fmt_int(o['size'])} values "
                 f"({_fmt_bytes(o['bytes'])}); train step "
                 f"{step if step is not None else c['step']}"
                 + ("" if step is not None else " (from the directory name)"))
  if "restored" in c:
    rs = c["restored"]
    lines.append(f"  restored onto {rs['device']}: readable, {rs['nonfinite_params']} "
                 f"non-finite parameter values")
  else:
    lines.append("  not restored (--norestore): data files not checked")
  if "data_state" in c:
    for proc, st in c["data_state"].items():
      lines.append(f"  data iterator (grain) {proc}: {json.dumps(st, sort_keys=True)}")
  return lines


def format_report(r: dict) -> str:
  lines = []
  cfg = r.get("config") or {}
  stages_cfg = cfg.get("stages")
  stages_cfg = ",".join(stages_cfg) if isinstance(stages_cfg, list) else stages_cfg
  lines.append(f"workdir {r['workdir']}")
  if cfg:
    lines.append(f"  experiment {cfg.get('name')} (scale {cfg.get('scale')}, seed "
                 f"{cfg.get('seed')}), configured stages: {stages_cfg}")
  else:
    lines.append("  no config.json")
  lines.append("stages:")
  for name, s in r["stages"].items():
    steps = ", ".join(map(str, s["steps"])) or "none"
    m = s["last_metrics"] or {}
    last = (f"last logged step {m.get('step')}" +
            (f" loss {m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else "")
            if m else "no metrics")
    extra = f"  [also: {', '.join(s['other_checkpoint_entries'])}]" \
        if s["other_checkpoint_entries"] else ""
    lines.append(f"  {name:<15} checkpoint steps: {steps:<12} final/: "
                 f"{'yes' if s['final'] else 'no ':<4} {last}{extra}")
  res = r.get("results")
  if res:
    lines.append("results.json (each key under the stage that produced it):")
    for stage, keys in results_by_stage(res).items():
      shown = [k for k in keys if not (k.endswith(CI) and k[:-len(CI)] in keys)]
      lines.append(f"  {stage:<15} " + ", ".join(_result_str(k, res[k], res.get(k + CI))
                                                  for k in shown))
  if cfg:
    lines.append("config:")
    scalars = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    lines.append("  " + " ".join(f"{k}={_short(v)}" for k, v in sorted(scalars.items())))
    for section, v in sorted(cfg.items()):
      if isinstance(v, dict):
        lines.append(f"  {section}: " + " ".join(f"{k}={_short(x)}" for k, x in sorted(v.items())))
  c = r["checkpoint"]
  lines += (_checkpoint_lines(c, r["workdir"]) if c is not None else
            [f"no checkpoint yet in stage {r['stage']} (nothing saved so far)"])
  m = r.get("last_metrics")
  lines.append(f"last metrics line ({r['stage']}): "
               + (json.dumps(m, sort_keys=True) if m else "none"))
  return "\n".join(lines)


def results_by_stage(results: dict) -> dict[str, list[str]]:
  """{stage: its keys} of results.json, by its `produced_by` map ({key: stage}), in stage
  order; keys it does not name (a file written before it existed) under "(not recorded)"."""
  by = results.get(PRODUCED_BY)
  by = by if isinstance(by, dict) else {}
  out: dict[str, list[str]] = {}
  for k in sorted(results):
    if k != PRODUCED_BY:
      out.setdefault(str(by.get(k, "(not recorded)")), []).append(k)
  order = {s: i for i, s in enumerate(STAGE_NAMES)}
  return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _result_str(key: str, v, ci=None) -> str:
  """`key`, with its mean (`qa_test 0.512`) and the mean's interval when `ci` (its `_ci`
  sibling) has one (`qa_test 0.512 [0.481, 0.543]`), or, for a plain string, its value."""
  if isinstance(v, dict) and isinstance(v.get("mean"), (int, float)):
    b = rundir.ci_bounds(ci.get("mean") if isinstance(ci, dict) else None)
    return f"{key} {v['mean']:.3f}" + (f" [{b[0]:.3f}, {b[1]:.3f}]" if b else "")
  if isinstance(v, str):
    return f"{key}={v}"
  return key


def _short(v) -> str:
  if isinstance(v, list):
    return ",".join(map(str, v)) or "()"
  if isinstance(v, str):
    return v if v else "''"
  return str(v)


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument {argv[1]!r}")
  if not _WORKDIR.value:
    raise ConfigError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)   # orbax warns about every item it reads
  # Read-only and host-side: never grab an accelerator unless the user asks for one.
  if not os.environ.get("JAX_PLATFORMS"):
    import jax
    jax.config.update("jax_platforms", "cpu")
  # orbax/tensorstore print to fd 2 from their own threads when a read fails (asyncio
  # "Event loop is closed" tracebacks, even after the failure was raised here): keep fd 2 aside
  # while reading, so that an error is one line, and replay it for an unexpected crash.
  saved_fd2, captured = os.dup(2), tempfile.TemporaryFile()
  sys.stderr.flush()
  os.dup2(captured.fileno(), 2)
  try:
    r = collect(_WORKDIR.value, _STAGE.value, _STEP.value, _RESTORE.value)
  except ConfigError as e:
    sys.stdout.flush()
    os.write(saved_fd2, f"kstore_jax.inspect: error: {e}\n".encode())
    os._exit(2)   # skip interpreter teardown: orbax's pending coroutines would print more
  except BaseException:
    sys.stderr.flush()
    os.dup2(saved_fd2, 2)
    captured.seek(0)
    sys.stderr.write(captured.read().decode(errors="replace"))
    raise
  sys.stderr.flush()
  os.dup2(saved_fd2, 2)
  if _JSON.value:
    print(json.dumps(r, sort_keys=True))
  else:
    print(format_report(r))
  sys.stdout.flush()


def run() -> None:
  """`python -m kstore_jax.inspect` (the shim kstore_jax/inspect.py calls this)."""
  cli.run(main, "kstore_jax.inspect", config_required=False)
