"""The read-side and developer tools (report, inspect, ask, bench, data) on bad input: a flag or
flag value, a file the tool reads, a place it cannot write. Each is one line on stderr naming
the culprit, exit status 2, no traceback, and nothing written. No run is trained here: the run
directories are hand-made (test_report's fake runs; a saved tiny config and a toy tokenizer)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import runs
from test_report import accs, fake_run
from test_tools import import_ask, one_line_error, tool

from configs import base
from kstore_jax.configlib import ConfigError
from kstore_jax.tools import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/tiny.py"


def listing(root: pathlib.Path) -> list[str]:
  """Every path under root: a failed tool leaves it as it was."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(tmp_path) -> tuple[pathlib.Path, list[str]]:
  """A directory that a process started with the returned command prefix cannot write in: as
  root, who writes anywhere, the prefix drops the capabilities that let it (setpriv)."""
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o555)
  if os.geteuid():
    return locked, []
  prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
  if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], check=False).returncode:
    pytest.skip("root, and no setpriv that drops its right to write anywhere")
  return locked, prefix


def edited(obj: dict, **edits) -> dict:
  """`obj` (a JSON object) with `edits` made: a key `a__b` is b of section a (made if
  missing); None removes it."""
  for key, value in edits.items():
    *sections, leaf = key.split("__")
    inner = obj
    for s in sections:
      inner = inner.setdefault(s, {})
    if value is None:
      del inner[leaf]
    else:
      inner[leaf] = value
  return obj


# -- report -----------------------------------------------------------------------------------
def edit(path: pathlib.Path, **edits) -> None:
  path.write_text(json.dumps(edited(json.loads(path.read_text()), **edits)))


# case -> (damage done to the finished fake run `run`, what the line names)
REPORT_CASES = {
    # exit 0 and an empty report
    "empty_dir": (lambda run: shutil.rmtree(run) or run.mkdir(), ["holds no run", "grid.json"]),
    # a note in the table ("unreadable results.json"), exit 0
    "results_no_json": (lambda run: (run / "results.json").write_text('{"qa_test": '),
                        ["results.json", "not a JSON file"]),
    "results_no_object": (lambda run: (run / "results.json").write_text("[1, 2, 3]"),
                          ["results.json", "not a JSON object"]),
    # "—" for the run, as if it had not been evaluated
    "results_key_type": (lambda run: edit(run / "results.json", qa_test="high"),
                         ["results.json", "'qa_test'", "an object"]),
    "results_leaf_type": (lambda run: edit(run / "results.json", qa_train__mean="0.9"),
                          ["results.json", "'qa_train.mean'", "a number"]),
    # a GPT-2 run, though model.causal was meant to say GBERT
    "config_key_type": (lambda run: edit(run / "config.json", model__causal="no"),
                        ["config.json", "'model.causal'", "true or false"]),
    "config_no_object": (lambda run: (run / "config.json").write_text('"single"'),
                         ["config.json", "not a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_refuses_a_bad_run_and_writes_nothing(tmp_path, case):
  damage, culprits = REPORT_CASES[case]
  run = tmp_path / "run"
  fake_run(run, "single", ("pretrain", "finetune", "eval"),
           {"qa_test": accs(0.1), "qa_train": accs(0.9), "bio_recall": accs(0.5)})
  damage(run)
  before = listing(tmp_path)
  one_line_error(tool("report", str(run), f"--out={tmp_path / 'out' / 'r.md'}"), "report",
                 *culprits)
  assert listing(tmp_path) == before


def test_report_out_under_a_file_writes_nothing(tmp_path):
  """It drew the PNGs' directory's first file and failed with a FileExistsError traceback."""
  run = tmp_path / "run"
  fake_run(run, "single", ("pretrain", "finetune", "eval"), {"qa_test": accs(0.1)})
  (tmp_path / "file").write_text("")
  before = listing(tmp_path)
  for out in (tmp_path / "file" / "r.md", tmp_path / "file" / "sub" / "r.md"):
    one_line_error(tool("report", str(run), f"--out={out}"), "report", f"--out={out}",
                   str(tmp_path / "file"))
  assert listing(tmp_path) == before


@pytest.mark.parametrize("fails", ["drawing", "writing"])
def test_report_writes_its_files_all_or_none(tmp_path, monkeypatch, fails):
  """Everything is drawn before the first file is written (a loss plot that failed left the
  accuracy PNG behind), and the files are written all or none (the markdown and the first
  PNG, then a refused second PNG: none of them left, nor the directory made for them). A
  metrics line with a byte UTF-8 cannot decode fails nothing."""
  run = tmp_path / "run"
  fake_run(run, "single", ("pretrain", "finetune", "eval"), {"qa_test": accs(0.1)})
  with open(run / "pretrain" / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 999, "loss": 0.1}\xff\n')
  out = tmp_path / "out" / "r.md"
  if fails == "drawing":
    def plot_losses(*args):
      raise ConfigError("drawing failed")
    monkeypatch.setattr(report, "plot_losses", plot_losses)
  else:
    def refusing_open(path, mode="r", *args, **kwargs):
      if "loss" in os.path.basename(path):
        raise PermissionError(13, "Permission denied", path)
      return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(report, "open", refusing_open, raising=False)
  with pytest.raises(ConfigError, match="drawing failed" if fails == "drawing" else re.escape(
      f"--out={out}: cannot write {out.parent / 'r_loss_run.png'} (Permission denied)")):
    report.build_report([str(run)], str(out))
  assert not out.parent.exists()
  monkeypatch.undo()
  text, pngs = report.build_report([str(run)], str(out))
  assert sorted(listing(out.parent)) == ["r.md", "r_accuracy.png", "r_loss_run.png"]
  assert "![loss single]" in text and len(pngs) == 2


@pytest.mark.parametrize("name, args, flag", [
    ("report", ["{run}", "--out={locked}/r.md"], "--out="),
    ("data", [TINY, "--export={locked}/bios"], "--export="),
])
def test_an_output_place_this_process_cannot_write_is_one_line(tmp_path, name, args, flag):
  """report --out / data --export into a directory the process may not write in: a
  PermissionError traceback (report: after drawing every PNG; data: after building the world)."""
  run = tmp_path / "run"
  fake_run(run, "single", ("pretrain", "finetune", "eval"), {"qa_test": accs(0.1)})
  locked, prefix = refused(tmp_path)
  args = [a.format(run=run, locked=locked) for a in args]
  before = listing(tmp_path)
  r = subprocess.run([*prefix, sys.executable, "-m", f"kstore_jax.{name}", *args], cwd=ROOT,
                     env=runs.env(), capture_output=True, text=True, timeout=120, check=False)
  one_line_error(r, name, flag, str(locked))
  assert listing(tmp_path) == before


# -- inspect ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["results.json", "config.json"])
def test_inspect_refuses_a_json_file_that_is_no_object(tmp_path, name):
  """`[1, 2, 3]` as results.json or config.json: an AttributeError traceback."""
  (tmp_path / "pretrain").mkdir()
  (tmp_path / name).write_text("[1, 2, 3]")
  one_line_error(tool("inspect", f"--workdir={tmp_path}"), "inspect", str(tmp_path / name),
                 "not a JSON object")


# -- ask --------------------------------------------------------------------------------------
def saved_run(path: pathlib.Path, **edits) -> pathlib.Path:
  """A run directory as ask reads it first: a tiny config.json with `edits` (`edited`) and a
  toy tokenizer.json."""
  from kstore_jax.data import tokenizer
  path.mkdir()
  (path / "config.json").write_text(json.dumps(edited(json.loads(base.get_config("tiny").to_json()),
                                                      **edits)))
  tokenizer.train_tokenizer(300, ["a toy corpus"]).save(str(path / "tokenizer.json"))
  return path


@pytest.mark.parametrize("edits, culprits", [
    ({"data__n_people": "sixty"}, ["'data.n_people'='sixty'", "expected int"]),   # TypeError
    ({"model": 5}, ["'model' must be a section"]),                                  # AttributeError
    ({"scale": "huge"}, ["'scale'='huge'", "paper|small|tiny"]),
])
def test_ask_validates_the_saved_config(tmp_path, edits, culprits):
  wd = saved_run(tmp_path / "run", **edits)
  one_line_error(tool("ask", f"--workdir={wd}", "--person=0"), "ask",
                 str(wd / "config.json"), *culprits)


def test_ask_takes_a_missing_key_as_its_default(tmp_path):
  """A run written before a key or section existed (data.mlm, say) reads as a resume reads it:
  the key at its default for the run's scale and variants; the saved mesh is not this
  process's."""
  ask = import_ask()
  wd = saved_run(tmp_path / "run", data__mlm=None, finetune__lora_rank=None, variants="lora",
                 mesh={"data": 64})
  path = str(wd / "config.json")
  cfg = ask.run_config(json.loads(pathlib.Path(path).read_text()), path)
  want = base.get_config("tiny,lora")
  assert cfg.data.mlm.to_dict() == want.data.mlm.to_dict()
  assert cfg.finetune.lora_rank == want.finetune.lora_rank == 16
  assert cfg.mesh.to_dict() == want.mesh.to_dict()
  pathlib.Path(path).write_text("[1, 2, 3]")
  with pytest.raises(ConfigError, match=f"{path}: not a JSON object"):
    ask.load_run(str(wd))


def test_ask_negative_seed_is_one_line(tmp_path):
  """NumPy's ValueError ("expected non-negative integer") from --random's draw."""
  wd = saved_run(tmp_path / "run")
  one_line_error(tool("ask", f"--workdir={wd}", "--random=2", "--seed=-1"), "ask", "--seed=-1")


@pytest.mark.parametrize("flag", ["--prompt", "--name"])
def test_ask_empty_prompt_or_name_is_one_line(tmp_path, flag):
  """`--prompt=` (an empty shell variable) printed nothing and exited 0."""
  wd = saved_run(tmp_path / "run")
  one_line_error(tool("ask", f"--workdir={wd}", f"{flag}= "), "ask", f"{flag}= is empty")


# -- bench ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, culprits", [
    # a RuntimeError around the child's traceback, naming data.n_people
    (["population", "--n=-5"], ["--n=-5"]),
    (["population", "--n=10000000000"], ["--n=10000000000", "half the name space"]),
    # a KeyError once the reference attention had compiled
    (["attention", TINY, "--attention=xla,bogus"], ["--attention=xla,bogus", "'bogus'",
                                                    "pallas_docs"]),
    # Grain's ValueError, then a second traceback from its iterator's close
    (["data", TINY, "--workers=0,-1"], ["--workers=0,-1", "'-1'", ">= 0"]),
    (["data", TINY, "--workers="], ["--workers=", "empty"]),
    (["data", TINY, "--imported=csv"], ["--imported=csv", "tfds"]),
    (["data", TINY, "--warmup=-1"], ["--warmup=-1"]),
    (["eval", TINY, "--eval_people=-3"], ["--eval_people=-3"]),
])
def test_bench_flag_values_are_one_line(args, culprits):
  one_line_error(tool("bench", *args), "bench", *culprits)


# -- data -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, culprits", [
    (["--export="], ["--export", "empty"]),                           # printed bios instead
    (["--format=jsonl"], ["--format=jsonl", "--export"]),             # silently ignored
    (["--export={file}/bios"], ["--export={file}/bios", "{file} is a file, not a directory"]),
    (["--export={file}"], ["--export={file}", "not a directory"]),
    # past the checks, the export's own OSError: bios.jsonl a link to nowhere
    (["--export={tmp}/dangling", "--format=jsonl"], ["--export=", "No such file or directory",
                                                    "bios.jsonl"]),
])
def test_data_export_flags_are_one_line_and_write_nothing(tmp_path, args, culprits):
  (tmp_path / "file").write_text("")
  (tmp_path / "dangling").mkdir()
  (tmp_path / "dangling" / "bios.jsonl").symlink_to(tmp_path / "nowhere" / "bios.jsonl")
  fill = dict(file=tmp_path / "file", tmp=tmp_path)
  before = listing(tmp_path)
  r = tool("data", TINY, "--config.data.n_people=40", *[a.format(**fill) for a in args])
  one_line_error(r, "data", *[c.format(**fill) for c in culprits])
  assert listing(tmp_path) == before


@pytest.mark.parametrize("made", [True, False])
def test_a_failed_export_leaves_nothing_of_it(tmp_path, monkeypatch, made):
  """A full disk mid-export: the records written so far stayed (in a directory that existed,
  beside what it held; or the whole directory this export made)."""
  from kstore_jax.data import export, records
  out = tmp_path / "bios"
  if not made:
    out.mkdir()
    (out / "notes.txt").write_text("the user's")

  def full_disk(rows, path):
    pathlib.Path(path).write_text('{"half": ')
    raise OSError(28, "No space left on device", path)
  monkeypatch.setattr(records, "write_jsonl", full_disk)
  with pytest.raises(OSError, match="No space left"):
    export.export(object(), str(out), "jsonl")
  if made:
    assert not out.exists()
  else:
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
