"""Loading and validating experiment configs, with one-line errors that name the culprit.

ml_collections' own errors for a missing file or an unknown override are long tracebacks that
do not name the flag, so `precheck_argv` looks at `--config=...` and `--config.a.b=v` before
absl parses them, and `validate` checks the resolved config against the defaults of its scale
(unknown keys, types) and against the semantics (ranges, stages, mesh, batch divisibility).

Importing it imports no jax (`report` reads results without it): `validate` imports the data,
model and train facts it checks against when it runs (WORKSPACE.md, "Layers").
"""

import ast
import importlib.util
import inspect
import math
import os
import re
import sys

import ml_collections
import numpy as np

from configs import base
from kstore_jax.errors import ConfigError, no_file   # below every layer; raised by them all


def fail(message: str, prog: str = "kstore_jax", status: int = 2) -> None:
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(status)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> the config its `get_config([arg])` returns (an empty `arg` after the
  colon is passed as ml_collections' flag passes it)."""
  path, colon, arg = spec.partition(":")
  if os.path.isdir(path):
    raise ConfigError(f"--config: {path!r} is a directory, not a config file")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: no such file {path!r}")
  if not path.endswith(".py"):
    raise ConfigError(f"--config: {path!r} is not a Python config file (path.py[:arg])")
  try:
    mod_spec = importlib.util.spec_from_file_location("_kstore_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(f"--config={spec}: {path} defines no get_config()")
    if colon and not inspect.signature(module.get_config).parameters:
      raise ConfigError(f"--config={spec}: {path} takes no ':{arg}' (its get_config() has no "
                        "argument)")
    return module.get_config(arg) if colon else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # a config file is user code: report its failure in one line
    raise ConfigError(f"--config={spec}: {type(e).__name__}: {e}") from None


def _lookup(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _check_override_value(key: str, current, text: str) -> None:
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"--config.{key}={text}: expected a boolean")
  elif isinstance(current, (int, float)):
    try:
      float(text) if isinstance(current, float) else int(text)
    except ValueError:
      kind = "a number" if isinstance(current, float) else "an integer"
      raise ConfigError(f"--config.{key}={text}: expected {kind}") from None


def precheck_argv(argv: list[str]) -> None:
  """Raise ConfigError for a missing config file or an unknown/ill-typed override."""
  spec, overrides = None, []
  for i, a in enumerate(argv[1:], 1):
    given = (a.split("=", 1)[1] if a.startswith("--config=")
             else argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if given is not None:
      if spec is not None:   # absl would keep the last one (or fail on the overrides)
        raise ConfigError(f"--config is given twice ({spec} and {given})")
      spec = given
    elif a.startswith("--config."):
      overrides.append(a[len("--config."):])
  if spec is None:
    raise ConfigError("--config is required (e.g. --config=configs/tiny.py)")
  cfg = load_config_file(spec)
  for o in overrides:
    key, has_value, text = o.partition("=")
    try:
      current = _lookup(cfg, key)
    except KeyError:
      raise ConfigError(f"--config.{key}: unknown config key {key!r}") from None
    if has_value:
      _check_override_value(key, current, text)


def _schema_check(cfg, ref, prefix: str = "") -> None:
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"config key {path!r} is unknown")
    value, want = cfg[key], ref[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {path!r} must be a section")
      if path == "data.groups":   # named by the user; each one has the keys of base.group
        want = ml_collections.ConfigDict({g: base.group(1.0, 1.0, 0.0) for g in value.keys()})
      _schema_check(value, want, path + ".")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config key {path!r}={value!r} must be a finite number")
    elif isinstance(want, bool) != isinstance(value, bool) or (
        isinstance(want, (int, float)) and not isinstance(value, (int, float))) or (
        isinstance(want, str) and not isinstance(value, str)) or (
        isinstance(want, (tuple, list)) and not isinstance(value, (tuple, list))):
      raise ConfigError(f"config key {path!r}={value!r} has type {type(value).__name__}, "
                        f"expected {type(want).__name__}")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


stage_list = base.stage_list   # the config's stages (the data layer reads them too)


def _check_aug(spec, key: str) -> None:
  """The bio augmentation keys of the data section or of one group (`key`: its path)."""
  for k in ("multi", "permute_copies"):
    _require(isinstance(spec[k], int) and spec[k] >= 1,
             f"{key}.{k}={spec[k]!r} must be an integer >= 1")
  _require(spec.permute_copies == 1 or spec.permute,
           f"{key}.permute_copies > 1 needs {key}.permute=True")


PPROBE_GROUPS = "pprobe needs one bio augmentation for everyone; data.groups is set"


def _check_groups(d, stages: tuple[str, ...]) -> None:
  """data.groups: each group's values, people and token shares summing to 1, no empty group,
  someone's QA in training, no P-probe (it assumes one bio augmentation)."""
  if not d.groups:
    return
  names = sorted(d.groups.keys())
  for n in names:
    g, key = d.groups[n], f"data.groups.{n}"
    for share in ("people", "tokens"):
      _require(0.0 < g[share] <= 1.0, f"{key}.{share}={g[share]} must be in (0, 1]")
    _require(0.0 <= g.qa_train_fraction < 1.0,
             f"{key}.qa_train_fraction={g.qa_train_fraction} must be in [0, 1)")
    _check_aug(g, key)
  for share in ("people", "tokens"):
    total = sum(d.groups[n][share] for n in names)
    _require(abs(total - 1.0) < 1e-6, f"data.groups: the {share} shares sum to {total:g} "
             f"({', '.join(f'{n}={d.groups[n][share]:g}' for n in names)}), not 1")
  from kstore_jax.data.world import group_bounds
  sizes = np.diff(group_bounds([d.groups[n].people for n in names], d.n_people))
  for n, size in zip(names, sizes):
    _require(size > 0, f"data.groups.{n}.people={d.groups[n].people:g} gives no person of "
             f"data.n_people={d.n_people}")
  qa_people = sum(round(d.groups[n].qa_train_fraction * size) for n, size in zip(names, sizes))
  _require(qa_people > 0, "data.groups: no group has people whose QA is training data "
           "(every qa_train_fraction rounds to 0 people)")
  _require("pprobe" not in stages, f"stages: {PPROBE_GROUPS}")


def _check_size(m) -> None:
  """model.size names the shape a config file gave the model (configs/base.py MODEL_SIZES);
  overriding it alone (`--config.model.size=small`) would leave the shape as it was under a
  new name: refused, naming the shape keys to set. A shape of no size (overridden keys) keeps
  its origin's name (bench reports it 'custom')."""
  _require(m.size in base.MODEL_SIZES,
           f"model.size={m.size!r} must be one of {'|'.join(base.MODEL_SIZES)}")
  actual = base.size_name(m)
  _require(actual in (m.size, "custom"),
           f"model.size={m.size!r} but the model's shape is {actual!r}'s: the size does not "
           "set the shape once the config is built; set model.num_layers, num_heads, "
           "d_model and d_ff (" + ", ".join(
               f"{k}={v}" for k, v in base.MODEL_SIZES[m.size].items()) + ")")


def _check_qa_split(cfg) -> None:
  """data.qa_valid_fraction in [0, 1); someone's QA still in training after it, and someone
  held out (the QA-test side eval and the probes score: with nobody there results.json got
  0% at n=0 and the bio-recall eval crashed)."""
  v = cfg.data.qa_valid_fraction
  _require(0.0 <= v < 1.0, f"data.qa_valid_fraction={v} must be in [0, 1)")
  from kstore_jax.data.world import qa_split
  train, valid = qa_split(cfg.seed, cfg.data)
  _require(train.any(),
           f"data.qa_train_fraction={cfg.data.qa_train_fraction:g} (with data.qa_valid_fraction="
           f"{v:g}) leaves nobody of data.n_people={cfg.data.n_people} whose QA is trained on")
  _require((~train & ~valid).any(),
           f"data.qa_train_fraction={cfg.data.qa_train_fraction:g} (with data.qa_valid_fraction="
           f"{v:g}) holds nobody out of data.n_people={cfg.data.n_people}: QA eval and the "
           "probes score held-out people")


def _check_source(d) -> None:
  """data.source: 'generated', or 'jsonl:FILE' / 'tfds:DIR' that exists (its records are
  checked when the world is built, before anything is written)."""
  from kstore_jax.data.records import GENERATED, parse_source
  kind, path = parse_source(d.source)
  _require(kind == GENERATED or os.path.exists(path),
           f"data.source={d.source!r}: no such {'directory' if kind == 'tfds' else 'file'}")


def _check_profile_steps(t) -> None:
  """train.profile_steps: '' or 'START,STOP' with 0 <= START < STOP."""
  from kstore_jax.train.profiling import parse_steps
  try:
    parse_steps(t.profile_steps)
  except ValueError as e:
    raise ConfigError(f"train.profile_steps={t.profile_steps!r}: {e}") from None


def validate(cfg, n_devices: int, platform: str | None = None,
             processes: int | None = None) -> None:
  """Check the resolved config; raise ConfigError naming the first bad key. `processes`: the
  run's process count (default: this cluster's, jax.process_count())."""
  from kstore_jax.data.pools import load_pools
  from kstore_jax.model import attention
  from kstore_jax.model.probes import HEADS as PROBE_HEADS
  from kstore_jax.model.transformer import (DTYPES, NORMS, REMAT_POLICIES, resolve_norm,
                                           rotary_dims)
  from kstore_jax.train.sharding import mesh_shape
  _require(cfg.get("scale") in ("paper", "small", "tiny"), f"config key 'scale'={cfg.get('scale')!r} must be paper|small|tiny")
  _schema_check(cfg, base.get_config(cfg.scale))
  stages = stage_list(cfg)
  for s in stages:
    _require(s in base.STAGE_NAMES, f"stages: unknown stage {s!r}; expected {base.STAGE_NAMES}")
  _require(len(stages) > 0, "stages: no stage to run")
  _require(isinstance(cfg.seed, int) and cfg.seed >= 0,
           f"seed={cfg.seed!r} must be an integer >= 0")
  d = cfg.data
  _check_aug(d, "data")
  _check_groups(d, stages)
  _require(0.0 <= d.qa_ratio < 1.0, f"data.qa_ratio={d.qa_ratio} must be in [0, 1)")
  _require(0.0 < d.qa_train_fraction < 1.0,
           f"data.qa_train_fraction={d.qa_train_fraction} must be in (0, 1)")
  space = load_pools().name_space
  _require(2 <= d.n_people <= space // 2,
           f"data.n_people={d.n_people} must be in [2, {space // 2}] (half the name space)")
  _check_qa_split(cfg)
  _require(d.seq_len >= 32, f"data.seq_len={d.seq_len} must be >= 32")
  _require(d.chunk_docs >= 1, f"data.chunk_docs={d.chunk_docs} must be >= 1")
  _require(d.workers >= 0, f"data.workers={d.workers} must be >= 0")
  if d.tokenizer_path and not os.path.isfile(d.tokenizer_path):
    raise no_file("data.tokenizer_path", d.tokenizer_path)
  _require(d.tokenizer_path or d.vocab_size >= 512, f"data.vocab_size={d.vocab_size} must be >= 512")
  _check_source(d)
  _require(0.0 < d.mlm.word_rate <= 1.0, f"data.mlm.word_rate={d.mlm.word_rate} must be in (0, 1]")
  for k in ("mask", "random"):
    _require(0.0 <= d.mlm[k] <= 1.0, f"data.mlm.{k}={d.mlm[k]} must be in [0, 1]")
  _require(d.mlm.mask + d.mlm.random <= 1.0,
           f"data.mlm.mask + data.mlm.random = {d.mlm.mask + d.mlm.random} must be <= 1")
  m = cfg.model
  _require(m.block in ("gpt2", "llama"), f"model.block={m.block!r} must be 'gpt2' or 'llama'")
  _require(m.dtype == "auto" or m.dtype in DTYPES,
           f"model.dtype={m.dtype!r} must be auto|{'|'.join(DTYPES)}")
  _require(m.attention == "auto" or m.attention in attention.IMPLEMENTATIONS,
           f"model.attention={m.attention!r} must be auto|{'|'.join(attention.IMPLEMENTATIONS)}")
  _require(m.norm == "auto" or m.norm in NORMS,
           f"model.norm={m.norm!r} must be auto|{'|'.join(NORMS)}")
  _require(m.remat in REMAT_POLICIES,
           f"model.remat={m.remat!r} must be {'|'.join(REMAT_POLICIES)}")
  _require(isinstance(m.scan_layers, bool), f"model.scan_layers={m.scan_layers!r} must be a bool")
  if platform is None:
    import jax
    platform = attention.platform_of(jax.devices())
  problem = attention.unsupported(
      attention.resolve(m.attention, platform), attention.resolve_dtype(m.dtype, platform),
      platform, d.seq_len)
  _require(problem is None, f"model.attention={m.attention!r}: {problem}")
  if m.flash_launch.strip():
    from kstore_jax.model import flash_docs   # Pallas: imported only where a launch is named
    try:
      launch = flash_docs.parse_launch(m.flash_launch)
    except ValueError as e:
      raise ConfigError(f"model.flash_launch={m.flash_launch!r}: {e}") from None
    problem = flash_docs.launch_unsupported(launch, m.num_heads, d.seq_len)
    _require(problem is None, f"model.flash_launch={m.flash_launch!r}: {problem}")
  norm = resolve_norm(m.norm, platform)
  _require(platform in NORMS[norm],
           f"model.norm={m.norm!r}: {norm} runs on {'|'.join(NORMS[norm])}, not {platform}")
  for k in ("num_layers", "num_heads", "d_model", "d_ff"):
    _require(m[k] >= 1, f"model.{k}={m[k]} must be >= 1")
  _require(m.d_model % m.num_heads == 0,
           f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
  _check_size(m)
  _require(0.0 <= m.rotary_fraction <= 1.0, f"model.rotary_fraction={m.rotary_fraction} must be in [0, 1]")
  head_dim = m.d_model // m.num_heads
  rotated = rotary_dims(head_dim, m.rotary_fraction)
  _require(rotated >= 2 or (m.rotary_fraction == 0 and m.causal),
           f"model.rotary_fraction={m.rotary_fraction} rotates {rotated} of a head's "
           f"{head_dim} dims: rotary is the model's only position signal, so "
           "rotate at least 2 (or set 0 for a causal model without positions)")
  _require(m.rotary_base > 0, f"model.rotary_base={m.rotary_base} must be > 0")
  try:
    data, fsdp, tensor = mesh_shape(cfg.mesh, n_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if processes is None:
    import jax
    processes = jax.process_count()
  rows = cfg.train.microbatch_rows
  _require(rows >= 0, f"train.microbatch_rows={rows} must be >= 0 (0: the whole batch)")
  # the caches are directories ('' off): a file there was taken silently (jax cached nothing)
  for key in ("compile_cache", "tokenizer_cache"):
    path = os.path.expanduser(cfg.train[key])
    _require(not path or not os.path.exists(path) or os.path.isdir(path),
             f"train.{key}={cfg.train[key]!r} is a file, not a directory")
  for s in stages:
    if s == "eval":
      continue
    st = cfg[s]
    _require(st.steps >= 1, f"{s}.steps={st.steps} must be >= 1")
    _require(st.lr > 0, f"{s}.lr={st.lr} must be > 0")
    _require(0 <= st.warmup_steps, f"{s}.warmup_steps={st.warmup_steps} must be >= 0")
    for k in ("b1", "b2"):   # Adam's moment decays: 1 never averages (b2: NaN updates)
      _require(0 <= st[k] < 1, f"{s}.{k}={st[k]} must be in [0, 1)")
    _require(st.eps > 0, f"{s}.eps={st.eps} must be > 0")
    _require(st.weight_decay >= 0, f"{s}.weight_decay={st.weight_decay} must be >= 0")
    _require(0 <= st.final_lr_fraction <= 1,
             f"{s}.final_lr_fraction={st.final_lr_fraction} must be in [0, 1]")
    _require(st.grad_clip > 0, f"{s}.grad_clip={st.grad_clip} must be > 0 (the global-norm "
             "clip: 0 zeroes every update, a negative one reverses it)")
    if s == "finetune":   # the embedding LoRA rides on the attention one (model/lora.py)
      for k in ("lora_rank", "lora_embed_rank"):
        _require(st[k] >= 0, f"finetune.{k}={st[k]} must be >= 0 (0: none)")
      _require(st.lora_alpha > 0, f"finetune.lora_alpha={st.lora_alpha} must be > 0 (the "
               "update is scaled by lora_alpha / rank: 0 would train nothing)")
      _require(st.lora_embed_rank == 0 or st.lora_rank > 0,
               f"finetune.lora_embed_rank={st.lora_embed_rank} needs finetune.lora_rank > 0 "
               "(with lora_rank=0 the stage is a full finetune)")
    _require(st.batch_size >= 1, f"{s}.batch_size={st.batch_size} must be >= 1")
    if s in ("pprobe", "qprobe"):   # any size: its batches are padded (data/probing.py)
      _require(st.head in PROBE_HEADS,
               f"{s}.head={st.head!r} must be one of {'|'.join(PROBE_HEADS)}")
      _require(st.embed_rank >= 0, f"{s}.embed_rank={st.embed_rank} must be >= 0")
    else:
      _require(st.batch_size % (data * fsdp) == 0,
               f"{s}.batch_size={st.batch_size} is not divisible by the data-parallel size "
               f"{data * fsdp} (mesh.data * mesh.fsdp)")
      # each process's pipeline makes an equal block of the batch (where processes share
      # rows, data * fsdp < processes, that is not implied by the line above)
      _require(st.batch_size % processes == 0,
               f"{s}.batch_size={st.batch_size} is not divisible by the {processes} processes")
      _require(rows == 0 or st.batch_size % rows == 0,
               f"train.microbatch_rows={rows} must divide {s}.batch_size={st.batch_size}")
  _require(rows % (data * fsdp) == 0,   # every microbatch spans every data-parallel device
           f"train.microbatch_rows={rows} is not divisible by the data-parallel size "
           f"{data * fsdp} (mesh.data * mesh.fsdp)")
  _require(m.num_heads % tensor == 0 and m.d_ff % tensor == 0,
           f"mesh.tensor={tensor} must divide model.num_heads={m.num_heads} and "
           f"model.d_ff={m.d_ff}")
  _require(m.d_model % fsdp == 0, f"mesh.fsdp={fsdp} must divide model.d_model={m.d_model}")
  for k in ("log_every", "save_every", "keep_checkpoints"):
    _require(cfg.train[k] >= 1, f"train.{k}={cfg.train[k]} must be >= 1")
  _require(cfg.train.save_minutes >= 0,
           f"train.save_minutes={cfg.train.save_minutes} must be >= 0 (0: step-count saves only)")
  _require(cfg.train.eval_people >= 0, f"train.eval_people={cfg.train.eval_people} must be >= 0")
  _require(cfg.train.memory_gb >= 0,
           f"train.memory_gb={cfg.train.memory_gb} must be >= 0 (0: the device's memory)")
  _require(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
  _require(cfg.eval.max_people >= 0,
           f"eval.max_people={cfg.eval.max_people} must be >= 0 (0: everyone)")
  _check_profile_steps(cfg.train)


def _literal_tuple(key: str, text: str) -> tuple:
  """`('pretrain', 'eval')` / `["a"]` as a tuple (ml_collections reads main's flags so)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"--config.{key}={text}: not a tuple literal") from None
  if not isinstance(value, (tuple, list)):
    raise ConfigError(f"--config.{key}={text}: not a tuple literal")
  return tuple(value)


def apply_override(cfg, key: str, text: str, prefix: str = "") -> None:
  """Set `cfg`'s dotted `key` from the command-line text `text`, parsed by the type of the
  current value (bool, int, float, str; a tuple from comma-separated items), as
  `--config.<prefix><key>=<text>` would; ConfigError for an unknown key or a bad value."""
  try:
    current = _lookup(cfg, key)
  except KeyError:
    raise ConfigError(f"--config.{prefix}{key}: unknown config key {prefix + key!r}") from None
  _check_override_value(prefix + key, current, text)
  if isinstance(current, bool):
    value = text.lower() in ("true", "1")
  elif isinstance(current, (int, float)):
    value = type(current)(float(text) if isinstance(current, float) else int(text))
  elif isinstance(current, (tuple, list)):   # a,b,c or a Python literal ('a', 'b') as main
    value = _literal_tuple(prefix + key, text) if text.lstrip()[:1] in "([" and text.strip() \
        else tuple(x.strip() for x in text.split(",") if x.strip())
  elif isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{prefix}{key}: is a section, not a value")
  else:
    value = text
  *path, last = key.split(".")
  node = cfg
  for part in path:
    node = node[part]
  node[last] = value


# -- grid configs (python -m kstore_jax.grid, bench grid) --------------------------------
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def split_config_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
  """(argv without --config arguments, the --config spec, the `key=value` overrides)."""
  rest, spec, overrides = [], None, []
  it = iter(argv)
  for a in it:
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config":
      spec = next(it, None)
    elif a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, spec, overrides


def load_grid(spec: str | None, overrides: list[str]):
  """The grid ConfigDict of `spec` with `overrides` applied (`grid.*` to the grid section,
  the rest to every run), its structure checked; ConfigError in one line otherwise."""
  from configs import grids
  if spec is None:
    raise ConfigError("--config is required (e.g. --config=configs/grids/demo.py:tiny)")
  g = load_config_file(spec)
  if not all(k in g for k in ("grid", "runs", "order")):
    raise ConfigError(f"--config={spec}: not a grid config (it needs `grid`, `runs` and "
                      "`order`: configs/grids/__init__.py make())")
  if sorted(g.order) != sorted(g.runs):
    raise ConfigError(f"--config={spec}: `order` does not name each run exactly once")
  if not g.runs:
    raise ConfigError(f"--config={spec}: the grid has no runs")
  for name in g.order:
    if not _RUN_NAME.match(name):
      raise ConfigError(f"--config={spec}: run name {name!r} is not a directory name")
  for o in overrides:
    key, has_value, text = o.partition("=")
    if not has_value:
      raise ConfigError(f"--config.{key}: expected --config.{key}=<value>")
    if key.startswith("grid."):
      apply_override(g.grid, key[len("grid."):], text, prefix="grid.")
    else:
      for name, run in g.runs.items():
        try:
          apply_override(run, key, text)
        except ConfigError as e:   # a key only some runs have (data.groups.<name>)
          raise ConfigError(f"run {name!r}: {e}") from None
  for key, choices in (("mode", grids.MODES), ("run_axis", grids.RUN_AXES),
                       ("eval_runs", grids.EVAL_RUNS), ("precompile", grids.PRECOMPILE)):
    if g.grid[key] not in choices:
      raise ConfigError(f"config key 'grid.{key}'={g.grid[key]!r} must be one of {choices}")
  max_runs = g.grid.max_runs
  if not isinstance(max_runs, int) or max_runs < 1:
    raise ConfigError(f"config key 'grid.max_runs'={max_runs!r} must be an integer >= 1")
  return g
