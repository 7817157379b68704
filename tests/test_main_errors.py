"""`python -m kstore_jax.main` refuses bad configs, flags and locked workdirs with one line on
stderr that names the culprit, a non-zero exit, and an existing workdir left untouched."""

import fcntl
import functools
import hashlib
import json
import pathlib
import re
import sys

import pytest
from runs import run_main

from configs import celeb_minority, single
from kstore_jax import configlib, experiment

CONFIG = "--config=configs/single.py:tiny"
SMALL = [
    "--config.data.n_people=100", "--config.data.seq_len=160", "--config.data.vocab_size=1024",
    "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.num_heads=4",
    "--config.model.d_ff=128", "--config.pretrain.batch_size=8", "--config.pretrain.steps=2",
    "--config.pretrain.warmup_steps=1", "--config.train.log_every=1",
    "--config.train.save_every=1", "--config.stages=pretrain",
]


def snapshot(root: pathlib.Path) -> dict:
  """Every path under root (the root included) -> (mtime_ns, size, sha256 for files)."""
  out = {}
  for p in [root, *sorted(root.rglob("*"))]:
    st = p.lstat()
    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, digest)
  return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, jax_cache):
  """A finished 2-step run: the existing workdir that failed invocations must not touch."""
  wd = tmp_path_factory.mktemp("errors") / "existing"
  r = run_main([CONFIG, f"--workdir={wd}", *SMALL], jax_cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "pretrain/final").is_dir()
  return wd


def assert_one_line_error(r, *culprits):
  assert r.returncode != 0, r.stdout[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith("kstore_jax.main: error: "), lines[0]
  for c in culprits:
    assert c in lines[0], lines[0]
  return lines[0]


def half_name_space() -> int:
  from kstore_jax.data.pools import load_pools
  return load_pools().name_space // 2


# (overrides replacing/added to SMALL, fake device count, substrings the line must contain)
BAD = {
    "unknown_key": (["--config.data.multy=3"], 1, ["data.multy"]),
    "wrong_type": (["--config.data.multi=abc"], 1, ["data.multi", "abc"]),
    "multi_zero": (["--config.data.multi=0"], 1, ["data.multi"]),
    # ml_collections reads `pretrain,bogus` as one string: the stage 'pretrain,bogus'.
    "unknown_stage": (["--config.stages=pretrain,bogus"], 1, ["stage", "bogus"]),
    "unknown_stage_tuple": (["--config.stages=('pretrain','bogus')"], 1, ["stage", "'bogus'"]),
    "mesh_vs_devices": (["--config.mesh.data=3"], 1, ["mesh", "1 devices"]),
    "batch_vs_data_parallel": (["--config.pretrain.batch_size=6"], 8,
                               ["pretrain.batch_size=6", "data-parallel"]),
    "missing_tokenizer": (["--config.data.tokenizer_path=/nonexistent.json"], 1,
                          ["data.tokenizer_path", "/nonexistent.json"]),
    # (said to be missing, as was a directory given for data.source's JSON-lines file)
    "tokenizer_a_directory": (["--config.data.tokenizer_path=configs"], 1,
                              ["data.tokenizer_path: 'configs' is a directory, not a file"]),
    "too_many_people": ([f"--config.data.n_people={half_name_space() + 1}"], 1,
                        ["data.n_people", "name space"]),
    "probe_head": (["--config.stages=('pretrain','pprobe')", "--config.pprobe.head=mlp"], 1,
                   ["pprobe.head", "'mlp'", "linear|embedding"]),
    "different_experiment": (["--config.data.n_people=120"], 1,
                             ["different experiment", "data.n_people"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_leaves_workdir_untouched(case, workdir, jax_cache):
  overrides, n_devices, culprits = BAD[case]
  before = snapshot(workdir)
  r = run_main([CONFIG, f"--workdir={workdir}", *SMALL, *overrides], jax_cache, n_devices)
  assert_one_line_error(r, *culprits)
  assert snapshot(workdir) == before


# validate's checks of a stage's and the model's numbers, in process (main runs validate before
# it writes anything): (--config.<key>=<value> overrides of configs/single.py:tiny, the line)
BAD_STAGE = {
    "lora_rank_negative": ({"finetune.lora_rank": "-4"}, "finetune.lora_rank=-4 must be >= 0"),
    "lora_embed_rank_negative": ({"finetune.lora_embed_rank": "-1"},
                                 "finetune.lora_embed_rank=-1 must be >= 0"),
    "lora_alpha_zero": ({"finetune.lora_alpha": "0"}, "finetune.lora_alpha=0.0 must be > 0"),
    "rotary_base_zero": ({"model.rotary_base": "0"}, "model.rotary_base=0.0 must be > 0"),
    "adam_b2_one": ({"pretrain.b2": "1"}, "pretrain.b2=1.0 must be in [0, 1)"),
    "adam_eps_zero": ({"finetune.eps": "0"}, "finetune.eps=0.0 must be > 0"),
    "negative_decay": ({"pretrain.weight_decay": "-0.1"},
                       "pretrain.weight_decay=-0.1 must be >= 0"),
    "final_lr_over_one": ({"pretrain.final_lr_fraction": "2"},
                          "pretrain.final_lr_fraction=2.0 must be in [0, 1]"),
    # GBERT (bidirectional) with no rotated dimension would not see word order at all
    "no_positions_bidirectional": ({"model.causal": "false", "model.rotary_fraction": "0.05"},
                                   "model.rotary_fraction=0.05 rotates 0 of a head's 32 dims"),
    # the size names the shape only in a config file: alone on the command line it would be a
    # tiny model reported as gpt2_small
    "size_alone": ({"model.size": "gpt2_small"},
                   "model.size='gpt2_small' but the model's shape is 'tiny''s"),
    "grad_clip_zero": ({"pretrain.grad_clip": "0"}, "pretrain.grad_clip=0.0 must be > 0"),
    "grad_clip_negative": ({"finetune.grad_clip": "-1"}, "finetune.grad_clip=-1.0 must be > 0"),
    "lora_embed_without_lora": ({"finetune.lora_rank": "0", "finetune.lora_embed_rank": "8"},
                                "finetune.lora_embed_rank=8 needs finetune.lora_rank > 0"),
    "batch_zero": ({"finetune.batch_size": "0"}, "finetune.batch_size=0 must be >= 1"),
    "microbatch_not_dividing": ({"train.microbatch_rows": "24"},
                                "train.microbatch_rows=24 must divide pretrain.batch_size=32"),
    "microbatch_negative": ({"train.microbatch_rows": "-8"},
                            "train.microbatch_rows=-8 must be >= 0"),
    "save_minutes_negative": ({"train.save_minutes": "-1"},
                              "train.save_minutes=-1.0 must be >= 0 (0: step-count saves only)"),
    # round(0.96 * 10) = 10 people trained on: nobody left for QA test (results.json got 0%
    # at n=0, then bio recall crashed)
    "probe_embed_rank_negative": ({"stages": "('pretrain','qprobe')", "qprobe.embed_rank": "-1"},
                                  "qprobe.embed_rank=-1 must be >= 0"),
    # round(0.1 * 4) = 0 people trained on: the fraction at fault is the train one
    "nobody_trained_on": ({"data.n_people": "4", "data.qa_train_fraction": "0.1"},
                          "data.qa_train_fraction=0.1 (with data.qa_valid_fraction=0) leaves "
                          "nobody of data.n_people=4 whose QA is trained on"),
    "nobody_held_out": ({"data.n_people": "10", "data.qa_train_fraction": "0.96"},
                        "data.qa_train_fraction=0.96 (with data.qa_valid_fraction=0) holds "
                        "nobody out of data.n_people=10"),
    # inf passed `lr > 0` and trained until the first step's non-finite check stopped it
    "lr_infinite": ({"pretrain.lr": "inf"}, "'pretrain.lr'=inf must be a finite number"),
    "eps_nan": ({"finetune.eps": "nan"}, "'finetune.eps'=nan must be a finite number"),
    "compile_cache_a_file": ({"train.compile_cache": "configs/base.py"},
                             "train.compile_cache='configs/base.py' is a file, not a directory"),
}


def test_paper_probes_on_8_and_16_devices():
  """The paper's probe batch of 50 divides neither 8 nor 16 devices: its batches are padded
  (data/probing.py), so `:paper,probe` validates on the launchers' device counts; a training
  stage's batch must still divide them."""
  from configs import base
  cfg = base.get_config("paper,probe")
  assert cfg.pprobe.batch_size == cfg.qprobe.batch_size == 50
  for n in (8, 16):
    configlib.validate(cfg, n, platform="cpu")
  configlib.apply_override(cfg, "pretrain.batch_size", "50")
  with pytest.raises(configlib.ConfigError, match="pretrain.batch_size=50 is not divisible"):
    configlib.validate(cfg, 8, platform="cpu")


def test_a_batch_the_processes_cannot_split_is_refused():
  """Processes that share rows (tensor across them: data * fsdp = 1 < 2 processes) each make
  an equal block of the batch: a finetune batch of 7 passed validation and stopped both
  processes with a traceback when the finetune started, after the pretraining."""
  cfg = single.get_config("tiny")
  for key, text in (("mesh.data", "1"), ("mesh.fsdp", "1"), ("mesh.tensor", "4"),
                    ("finetune.batch_size", "7")):
    configlib.apply_override(cfg, key, text)
  configlib.validate(cfg, 4, platform="cpu", processes=1)
  with pytest.raises(configlib.ConfigError,
                     match=r"^finetune.batch_size=7 is not divisible by the 2 processes$"):
    configlib.validate(cfg, 4, platform="cpu", processes=2)


def test_a_tensor_axis_that_does_not_divide_the_vocab_trains(tmp_path, jax_cache):
  """mesh.tensor = 3 (a 6-GPU node: data 2 x tensor 3, 3 heads) divides the heads, d_model and
  d_ff but not the model's vocab (896: a multiple of 128): validation passed and init refused
  to split it, after the workdir was written. The vocab now stays whole along `tensor`."""
  wd = tmp_path / "tensor3"
  r = run_main([CONFIG, f"--workdir={wd}", *SMALL, "--config.model.d_model=96",
                "--config.model.num_heads=3", "--config.model.d_ff=192",
                "--config.pretrain.batch_size=6", "--config.mesh.data=2",
                "--config.mesh.fsdp=1", "--config.mesh.tensor=3"], jax_cache, n_devices=6)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "pretrain/final").is_dir()


def test_sizes_and_positions_that_are_fine():
  """A shape overridden key by key keeps its origin's name (reported 'custom'); the size with
  its own shape, and a causal model without positions, are valid."""
  from configs import base
  cfg = single.get_config("tiny")
  for key, text in (("model.num_layers", "2"), ("model.causal", "true"),
                    ("model.rotary_fraction", "0")):
    configlib.apply_override(cfg, key, text)
  configlib.validate(cfg, 1, platform="cpu")
  assert base.size_name(cfg.model) == "custom"
  for k, v in {"size": "small", **base.MODEL_SIZES["small"]}.items():
    configlib.apply_override(cfg, f"model.{k}", str(v))
  configlib.validate(cfg, 1, platform="cpu")
  assert base.size_name(cfg.model) == "small"


@pytest.mark.parametrize("case", sorted(BAD_STAGE))
def test_bad_stage_numbers_are_one_line_errors(case):
  overrides, culprit = BAD_STAGE[case]
  cfg = single.get_config("tiny,lora")   # a LoRA finetune (rank 16, embedding rank 128): valid
  configlib.validate(cfg, 1, platform="cpu")
  for key, text in overrides.items():
    configlib.apply_override(cfg, key, text)
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(cfg, 1, platform="cpu")
  assert culprit in str(e.value) and "\n" not in str(e.value), str(e.value)


# data.groups of configs/celeb_minority.py (groups `minority` and `star`), with SMALL's 100 people
BAD_GROUPS = {
    "unknown_group": (["--config.data.groups.celebrity.people=0.5"],
                      ["data.groups.celebrity.people", "unknown"]),
    "shares_not_summing_to_1": (["--config.data.groups.star.people=0.3"],
                                ["data.groups", "people shares sum to 1.13333"]),
    "empty_group": (["--config.data.groups.star.people=0.001",
                     "--config.data.groups.minority.people=0.999"],
                    ["data.groups.star.people=0.001", "no person"]),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUPS))
def test_bad_groups_leave_workdir_untouched(case, workdir, jax_cache):
  overrides, culprits = BAD_GROUPS[case]
  before = snapshot(workdir)
  r = run_main(["--config=configs/celeb_minority.py:tiny", f"--workdir={workdir}", *SMALL,
                *overrides], jax_cache)
  assert_one_line_error(r, *culprits)
  assert snapshot(workdir) == before


def test_missing_config_file(workdir, jax_cache):
  before = snapshot(workdir)
  r = run_main(["--config=configs/no_such_row.py:tiny", f"--workdir={workdir}"], jax_cache)
  assert_one_line_error(r, "no_such_row.py")
  assert snapshot(workdir) == before


@pytest.mark.parametrize("spec, message", [
    ("configs/tiny.py:huge", r"^--config=configs/tiny.py:huge: configs/tiny.py takes no ':huge'"),
    ("configs/single.py:huge", r"^--config=configs/single.py:huge: ValueError: config scale 'huge'"),
    # ml_collections' flag passes the empty argument on (its traceback was the whole line)
    ("configs/single.py:", r"^--config=configs/single.py:: ValueError: config scale ''"),
    ("README.md", r"^--config: 'README.md' is not a Python config file"),
    ("configs", r"^--config: 'configs' is a directory, not a config file"),
    # a Python file that is no config: the line named the module '_kstore_config'
    ("configs/grids/__init__.py", r"^--config=configs/grids/__init__.py: configs/grids/"
                                  r"__init__.py defines no get_config\(\)$"),
])
def test_bad_config_argument_names_it(spec, message):
  """A config file's ':argument' it cannot take, or a path that is no config file: one line
  naming the spec, not a traceback."""
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.load_config_file(spec)


def test_config_given_twice_is_refused():
  """absl kept the last --config, or with an override failed with 'defined twice'."""
  with pytest.raises(configlib.ConfigError,
                     match=r"^--config is given twice \(configs/tiny.py and configs/single.py\)$"):
    configlib.precheck_argv(["main", "--config=configs/tiny.py", "--config", "configs/single.py"])


def test_workdirs_that_cannot_hold_a_run_are_refused(tmp_path):
  """Checked before anything is written: a path under a file (NotADirectoryError at the lock
  before), an experiment nested in another (a run in a grid's directory or inside a run's,
  a grid in a run's: they ran and wrote into it)."""
  from kstore_jax import rundir
  (tmp_path / "file").write_text("x")
  run, grid = tmp_path / "run", tmp_path / "grid"
  for d in (run / "pretrain" / "checkpoints", grid / "single"):
    d.mkdir(parents=True)
  for f in (rundir.CONFIG, rundir.WORLD):
    (run / f).write_text("{}")
  (grid / rundir.GRID).write_text("{}")
  for path, holds, says in (
      (tmp_path / "file" / "sub", "run", f"{tmp_path / 'file'} is a file, not a directory"),
      (grid, "run", "holds a grid (grid.json)"),
      (run, "grid", "holds a run (config.json), not a grid"),
      (run / "pretrain", "run", f"is inside the run directory {run}"),
      (run / "pretrain" / "checkpoints" / "7", "grid", f"is inside the run directory {run}")):
    with pytest.raises(configlib.ConfigError, match=re.escape(says)):
      rundir.check_workdir(str(path), holds)
  before = snapshot(tmp_path)
  for path, holds in ((grid / "single", "run"), (grid, "grid"), (run, "run"),
                      (tmp_path / "new" / "deeper", "run")):   # a grid's run, resumed alone
    rundir.check_workdir(str(path), holds)
  assert snapshot(tmp_path) == before


def test_a_stage_without_its_source_writes_nothing(tmp_path, jax_cache):
  """stages=eval in a new workdir: the line came after config.json, world.json,
  tokenizer.json and the lock were written (the workdir then held that experiment)."""
  wd = tmp_path / "new"
  small = [a for a in SMALL if not a.startswith("--config.stages=")]
  r = run_main([CONFIG, f"--workdir={wd}", *small, "--config.stages=eval"], jax_cache)
  assert_one_line_error(r, "stages: 'eval' needs one of")
  assert not wd.exists()


def test_a_step_too_large_for_the_machine_writes_nothing(tmp_path, jax_cache):
  """A data.seq_len of 10^7 was refused after the workdir was written (config.json, world,
  tokenizer, metrics, events); 10^8 was killed for memory with no line at all. The first
  stage's step is compiled and sized before the workdir is taken (train.memory_gb stands in
  for a small machine here)."""
  wd = tmp_path / "new"
  r = run_main([CONFIG, f"--workdir={wd}", *SMALL, "--config.train.memory_gb=0.001"], jax_cache)
  assert_one_line_error(r, "[pretrain] the pretrain step needs", "train.memory_gb=0.001")
  assert not wd.exists()


@pytest.mark.parametrize("env, says", [
    ({"KSTORE_NUM_PROCESSES": "abc"}, "KSTORE_NUM_PROCESSES='abc' must be a whole number"),
    ({"KSTORE_NUM_PROCESSES": "2"}, "KSTORE_NUM_PROCESSES=2 needs KSTORE_COORDINATOR"),
    ({"KSTORE_NUM_PROCESSES": "2", "KSTORE_COORDINATOR": "h:1", "KSTORE_PROCESS_ID": "x"},
     "KSTORE_PROCESS_ID='x' must be a whole number"),
])
def test_bad_process_environment_is_one_line(env, says, monkeypatch):
  from kstore_jax.tools import runtime
  for k in ("KSTORE_NUM_PROCESSES", "KSTORE_COORDINATOR", "KSTORE_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(configlib.ConfigError, match=re.escape(says)):
    runtime.maybe_initialize_distributed()


def test_a_file_the_system_refuses_is_one_line(capsys, monkeypatch):
  """An OSError naming a file (permissions, a full disk) inside a tool: one line naming it,
  status 1; one naming no file keeps its traceback."""
  from kstore_jax.tools import cli
  monkeypatch.setattr(sys, "argv", ["tool"])

  def refused(argv):
    raise PermissionError(13, "Permission denied", "/runs/x/.lock")
  with pytest.raises(SystemExit) as e:
    cli.run(refused, "kstore_jax.tool", config_required=False)
  assert e.value.code == 1
  assert capsys.readouterr().err == "kstore_jax.tool: error: /runs/x/.lock: Permission denied\n"

  def other(argv):
    raise OSError("no file")
  with pytest.raises(OSError, match="no file"):
    cli.run(other, "kstore_jax.tool", config_required=False)


def test_seq_len_shorter_than_longest_document(tmp_path, jax_cache):
  # A new workdir (an existing one would refuse the changed seq_len first) is not created.
  wd = tmp_path / "new"
  r = run_main([CONFIG, f"--workdir={wd}", *SMALL, "--config.data.seq_len=40"], jax_cache)
  assert_one_line_error(r, "data.seq_len=40", "longest document")
  assert not wd.exists()


def test_negative_seed_is_refused_by_validate():
  """NumPy's SeedSequence takes no negative seed: validate names the key before a new
  workdir's world is drawn (an existing workdir would name the changed seed first)."""
  c = single.get_config("tiny")
  c.seed = -1
  with pytest.raises(configlib.ConfigError, match=r"^seed=-1 must be an integer >= 0$"):
    configlib.validate(c, 1, platform="cpu")


def test_unknown_flag_is_one_line(workdir, jax_cache):
  """A mistyped flag (absl alone prints 'FATAL Flags parsing error' and a hint: two lines)."""
  before = snapshot(workdir)
  r = run_main([CONFIG, f"--workdri={workdir}", *SMALL], jax_cache)
  assert_one_line_error(r, "'workdri'", "workdir")
  assert r.returncode == 2 and snapshot(workdir) == before


def test_a_url_workdir_is_one_line_and_writes_nothing(jax_cache):
  """`gs://bucket/x` was taken as a local directory `gs:/bucket/x` (made under the working
  directory, files written in it) and the first checkpoint save failed with a traceback."""
  from kstore_jax import rundir
  for ok in ("runs/x", "/tmp/a:b", "a://b"[1:]):
    rundir.check_workdir(ok)
  r = run_main([CONFIG, "--workdir=gs://bucket/x", *SMALL], jax_cache)
  assert_one_line_error(r, "--workdir=gs://bucket/x: a URL")
  assert not (pathlib.Path(__file__).resolve().parents[1] / "gs:").exists()


def test_several_slurm_tasks_without_srun_is_one_line(tmp_path, jax_cache):
  """A batch script (or an salloc shell) of an allocation of 4 tasks that runs main itself,
  not through srun: SLURM_NTASKS=4 without the step's node list, where jax's SLURM cluster
  finds nothing (a ValueError traceback); nothing is written. KSTORE_NUM_PROCESSES=1 runs it
  alone."""
  slurm = dict(SLURM_NTASKS="4", SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_LOCALID="0")
  wd = tmp_path / "w"
  args = [CONFIG, f"--workdir={wd}", *SMALL]
  r = run_main(args, jax_cache, **slurm)
  assert_one_line_error(r, "SLURM_NTASKS=4", "srun", "KSTORE_NUM_PROCESSES=1")
  assert r.returncode == 2 and not wd.exists()
  r = run_main(args, jax_cache, KSTORE_NUM_PROCESSES="1", **slurm)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "pretrain/final").is_dir()


def test_missing_workdir_flag(jax_cache):
  r = run_main([CONFIG, *SMALL], jax_cache)
  assert_one_line_error(r, "--workdir")


def test_locked_workdir_refuses(workdir, jax_cache):
  with open(workdir / ".lock", "a") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)   # as a running experiment holds it
    before = snapshot(workdir)
    r = run_main([CONFIG, f"--workdir={workdir}", *SMALL], jax_cache)
    after = snapshot(workdir)
  line = assert_one_line_error(r, str(workdir), "locked")
  assert "--workdir=" in line
  assert after == before



DROP = object()


def saved_workdir(path: pathlib.Path, cfg, edits: dict) -> experiment.Workdir:
  """A workdir whose config.json is cfg's with `edits` ({dotted key: value}; DROP: the key is
  missing, as in a run written before the key existed)."""
  saved = json.loads(cfg.to_json())
  for key, value in edits.items():
    *parents, leaf = key.split(".")
    section = functools.reduce(dict.__getitem__, parents, saved)
    if value is DROP:
      del section[leaf]
    else:
      section[leaf] = value
  (path / "config.json").write_text(json.dumps(saved))
  return experiment.Workdir(str(path))


def tiny_word_rate(rate: float):
  c = single.get_config("tiny")
  c.data.mlm.word_rate = rate
  return c


# (config now, edits of the saved config.json, None: resumes | what the refusal names)
RESUME_CASES = {
    "saved_before_data_mlm": (lambda: single.get_config("tiny"), {"data.mlm": DROP}, None),
    "saved_before_mlm_and_groups": (lambda: single.get_config("tiny"),
                                    {"data.mlm": DROP, "data.groups": DROP}, None),
    # the defaults are the config's scale's (tiny: 128) and variants' (lora: rank 16)
    "scale_default": (lambda: single.get_config("tiny"), {"data.seq_len": DROP}, None),
    "variant_default": (lambda: single.get_config("tiny,lora"), {"finetune.lora_rank": DROP},
                        None),
    "saved_value_differs": (lambda: single.get_config("tiny"), {"data.mlm.word_rate": 0.3},
                            "'data.mlm.word_rate' is 0.3 there, 0.15 now"),
    "missing_but_not_default_now": (lambda: tiny_word_rate(0.3), {"data.mlm": DROP},
                                    "'data.mlm.word_rate' is 0.15 there, 0.3 now"),
    "groups_added": (lambda: celeb_minority.get_config("tiny"), {"data.groups": DROP},
                     "'data.groups.minority."),
    # dtype compared as resolved here (CPU: auto = float32); kernels and remat are not compared
    "saved_float32_resumes_auto": (lambda: single.get_config("tiny"),
                                   {"model.dtype": "float32", "model.remat": False,
                                    "model.attention": "xla"}, None),
    "saved_bfloat16_is_another_run": (lambda: single.get_config("tiny"),
                                      {"model.dtype": "bfloat16"},
                                      "'model.dtype' is 'bfloat16' there, 'float32' now"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_treats_missing_keys_as_defaults(case, tmp_path):
  make_cfg, edits, culprit = RESUME_CASES[case]
  cfg = make_cfg()
  wd = saved_workdir(tmp_path, cfg, edits)
  if culprit is None:
    wd.check_same_experiment(cfg, "cpu")
    return
  with pytest.raises(configlib.ConfigError, match="different experiment") as e:
    wd.check_same_experiment(cfg, "cpu")
  assert culprit in str(e.value)


@pytest.mark.parametrize("text, says", [
    ('{"seed": ', "config.json: not a JSON file (Expecting value"),   # cut short
    (b'{"seed": "\xff"}', "config.json: not a JSON file ("),          # not UTF-8
    ("[1, 2, 3]", "config.json: not a JSON object (it holds [1, 2, 3])")])
def test_resume_of_a_damaged_config_names_the_file(text, says, tmp_path):
  """A resumed workdir's config.json that holds no config: the line named no file (a bare
  'Expecting value: line 1 column 1') or was a traceback."""
  path = tmp_path / "config.json"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(configlib.ConfigError, match=re.escape(f"{tmp_path}/{says}")):
    experiment.Workdir(str(tmp_path)).check_same_experiment(single.get_config("tiny"), "cpu")


def test_resume_of_damaged_results_names_the_file_first(tmp_path):
  """A resumed workdir's results.json that holds no results: the line came after
  Experiment.start had rewritten config.json, world.json and tokenizer.json."""
  wd = experiment.Workdir(str(tmp_path))
  wd.check_results()   # none yet: fine
  for text, says in (('{"qa_test": ', "results.json: not a JSON file"),
                     ("[1]", "results.json: not a JSON object (it holds [1])")):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(configlib.ConfigError, match=re.escape(f"{tmp_path}/{says}")):
      wd.check_results()


def test_a_directory_for_a_bio_file_is_said_to_be_one(tmp_path):
  from kstore_jax.data import records
  with pytest.raises(configlib.ConfigError,
                     match=re.escape(f"data.source: '{tmp_path}' is a directory, not a file")):
    records.read_jsonl(str(tmp_path))
  with pytest.raises(configlib.ConfigError, match=re.escape("data.source: no such file")):
    records.read_jsonl(str(tmp_path / "bios.jsonl"))
