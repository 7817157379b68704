"""Imports point down the layers (WORKSPACE.md, "Layers"), and `report` runs without jax.

Every module of `kstore_jax` and `configs` is parsed (ast, not imported) and each of its imports
of the two packages, module-level or inside a function, is checked against LAYERS: a module may
import its own layer and the layers below it, never one above it or a sibling of its rank
(train and eval do not import each other; configs and base neither). A new module must be
given a layer here.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `python -m <shim>` runs the tool kstore_jax.tools.<name> (test_shims_only_call_their_tool).
SHIMS = ("kstore_jax.main", "kstore_jax.grid", "kstore_jax.data.__main__", "kstore_jax.ask",
         "kstore_jax.inspect", "kstore_jax.report", "kstore_jax.bench")
# (layer, rank, modules): a name covers that module and, for a package, everything in it.
# `kstore_jax` alone is the package's __init__ (it covers nothing below it).
LAYERS = (
    ("configs", 0, ("configs",)),        # the config schema: imports nothing of kstore_jax
    ("base", 0, ("kstore_jax", "kstore_jax.errors", "kstore_jax.heap",
                 "kstore_jax.rundir")),   # rundir: the run-directory layout, no jax
    ("data", 1, ("kstore_jax.data",)),
    ("model", 2, ("kstore_jax.model",)),
    ("train", 3, ("kstore_jax.train",)),
    ("eval", 3, ("kstore_jax.eval",)),
    ("experiment", 4, ("kstore_jax.experiment", "kstore_jax.configlib")),
    ("tools", 5, ("kstore_jax.tools",) + SHIMS),
)
PACKAGES = ("kstore_jax", "configs")
# What `report` must not load (it reads results.json and draws with matplotlib).
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int] | None:
  """The layer of a module: the longest name in LAYERS that is it or a package above it
  (`kstore_jax` only itself)."""
  best = None
  for layer, rank, names in LAYERS:
    for n in names:
      covers = module == n or (n != "kstore_jax" and module.startswith(n + "."))
      if covers and (best is None or len(n) > len(best[0])):
        best = (n, (layer, rank))
  return best and best[1]


def imports_of(module: str, source: str, known) -> list[tuple[int, str]]:
  """(line, imported module) of every import of PACKAGES in `source`, at any depth; `from P
  import x` counts as P.x where that is a module, else as P."""
  is_package = module in {m for m in known if any(k.startswith(m + ".") for k in known)}
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:   # relative: from the module's package
        pkg = module.split(".")
        pkg = pkg if is_package else pkg[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      out += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
              for a in node.names]
  return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES]


def violations(module: str, source: str, known) -> list[str]:
  layer, rank = layer_of(module)
  bad = []
  for line, target in imports_of(module, source, known):
    to = layer_of(target)
    if to is None:
      bad.append(f"{module}:{line} imports {target}, which has no layer in LAYERS")
    elif to[0] != layer and to[1] >= rank:
      bad.append(f"{module}:{line} ({layer}) imports {target} ({to[0]}): "
                 f"{'a sibling' if to[1] == rank else 'a higher'} layer")
  return bad


def test_every_module_has_a_layer():
  missing = [m for m in all_modules() if layer_of(m) is None]
  assert not missing, f"give these modules a layer in LAYERS (and WORKSPACE.md): {missing}"


def test_imports_point_down():
  known = all_modules()
  bad = [v for m, p in known.items() for v in violations(m, p.read_text(), known)]
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, source, culprit", [
    ("kstore_jax.data.probing", "from kstore_jax.model.probes import HEADS",
     "kstore_jax.model.probes"),
    ("kstore_jax.train.throughput", "def f():\n  from kstore_jax import experiment\n",
     "kstore_jax.experiment"),
    ("kstore_jax.eval.qa_eval", "import kstore_jax.train.step", "kstore_jax.train.step"),
    ("kstore_jax.model.lora", "from ..data import world", "kstore_jax.data.world"),  # allowed
    ("kstore_jax.data.world", "from . import masking", "kstore_jax.data.masking"),    # allowed
])
def test_checker_flags_upward_and_sideways_imports(module, source, culprit):
  """The checker itself: an upward import (at any depth) and a sibling import are flagged;
  downward and same-layer imports (relative ones too) pass."""
  known = all_modules()
  assert [m for _, m in imports_of(module, source, known)] == [culprit]
  found = violations(module, source, known)
  upward = layer_of(culprit)[1] >= layer_of(module)[1] and (
      layer_of(culprit)[0] != layer_of(module)[0])
  assert bool(found) == upward, found


@pytest.mark.parametrize("shim", SHIMS)
def test_shims_only_call_their_tool(shim):
  """A documented command's module is a docstring and `if __name__ == "__main__":` importing
  its tool and calling `run()`; the code is in kstore_jax/tools/."""
  tool = "data" if shim == "kstore_jax.data.__main__" else shim.split(".")[-1]
  tree = ast.parse(all_modules()[shim].read_text())
  doc, main = tree.body if len(tree.body) == 2 else (None, None)
  assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), ast.dump(tree)
  assert f"kstore_jax/tools/{tool}.py" in " ".join(doc.value.value.split())
  assert isinstance(main, ast.If) and ast.unparse(main.test) == "__name__ == '__main__'"
  assert [ast.unparse(s) for s in main.body] == [
      f"from kstore_jax.tools import {tool}", f"{tool}.run()"]


def test_report_runs_without_jax(tmp_path):
  """`python -m kstore_jax.report` on a finished run writes its table and PNGs and never
  imports jax, flax or the training libraries."""
  run = tmp_path / "single"
  (run / "pretrain").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(
      {"name": "single", "stages": ["pretrain", "finetune", "eval"], "seed": 0}))
  acc = {a: 0.5 for a in ("birth_date", "birth_city", "university", "major", "company",
                          "company_city", "mean")}
  (run / "results.json").write_text(json.dumps({"qa_test": acc, "qa_train": acc}))
  (run / "pretrain" / "metrics.jsonl").write_text(
      "".join(json.dumps({"step": s, "loss": 4.0 / s}) + "\n" for s in range(1, 5)))
  out = tmp_path / "report.md"
  script = (
      "import json, runpy, sys\n"
      f"sys.argv = ['kstore_jax.report', {str(run)!r}, '--out={out}']\n"
      "try:\n"
      "  runpy.run_module('kstore_jax.report', run_name='__main__')\n"
      "except SystemExit as e:\n"
      "  assert not e.code, e.code\n"
      f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n")
  r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == []
  assert "`single`" in out.read_text() and list(tmp_path.glob("report_*.png"))
