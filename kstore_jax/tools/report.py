"""The Fig-3-style report of finished runs: `python -m kstore_jax.report RUN_DIR... [--out=F]`.

    python -m kstore_jax.report runs/tiny/single runs/tiny/multi5_permute --out=runs/tiny/report.md
    python -m kstore_jax.report runs/fig3 --out=runs/fig3/report.md     (a grid directory)

A grid directory (`python -m kstore_jax.grid`: it holds grid.json) stands for its runs in
the grid's order; a run not started or not finished yet shows as "—".

Reads each run directory's `config.json` (its `name` is the data row; its stages name the QA
training: `pretrain_mixed` a mixed-training run, `finetune` a QA-finetune run, neither a run
with no QA training, shown in a column of its own, no paper number, outside the ordering
against the paper) and `results.json`
(`qa_test`, `qa_train`, `bio_recall`; `qa_valid`, `pprobe`, `qprobe`, `qa_test_by_tokens` when
present; each accuracy's 95% Wilson interval from the `<key>_ci` siblings, printed as
`56.7 [54.2, 59.1]` where the file has them), and writes a markdown report: the headline table (data rows x finetune / mixed held-out QA
accuracy, the paper's number beside each), a per-run table (per-attribute test accuracy, train
half, bio recall), GPT vs GBERT vs Llama (the architecture from `model.causal`/`model.block`),
single- vs multi-token answers per attribute, probe tables, held-out QA per group for runs
with `groups` (celeb_minority, minority_only), and PNG plots next to the report (accuracy bars,
loss curves per stage from `<run>/<stage>/metrics.jsonl`, one P-probe heatmap per run). The
markdown is printed too.

A run without (complete) results is listed with "—" and a note. One line on stderr (exit status
2), and nothing written, for: a RUN_DIR that does not exist or holds no run (no config.json,
results.json or grid.json), a config.json or results.json that cannot be read, holds no JSON
object or holds a key the report reads with a value of another type (`"qa_test": "high"`), and
an --out that cannot be written. Everything is computed before the first file is written.
"""

import dataclasses
import io
import json
import os
import re
import sys

from absl import flags

from configs import base
from configs.base import TRAINED_STAGES
from kstore_jax import rundir
from kstore_jax.configlib import ConfigError
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.rundir import CI
from kstore_jax.tools import cli

OUT = flags.DEFINE_string("out", "report.md", "markdown file to write; PNGs go next to it")

ATTR_SHORT = {"birth_date": "date", "birth_city": "city", "university": "univ",
              "major": "major", "company": "company", "company_city": "c.city"}
MODES, NO_QA = base.QA_METHODS, base.NO_QA   # the paper's two methods; a run with neither
EVAL_KEYS = ("qa_", "bio_recall", "groups", "evaluated_stage")   # results.json: the eval's keys
MODE_COLORS = {"finetune": "tab:blue", "mixed": "tab:orange", NO_QA: "tab:gray"}

# PAPER.md, "Headline numbers": held-out QA exact match (%), averaged over attributes.
PAPER_FINETUNE = {
    "single": 9.7, "single_fullname": 48.9, "single_permute1": 4.4, "single_permute2": 53.2,
    "single_permute5": 70.0, "multi2": 41.1, "multi2_permute": 91.2, "multi5": 41.0,
    "multi5_fullname": 82.4, "multi5_permute": 96.6, "multi5_permute_fullname": 96.2}
# Mixed training: 86.6 for single; "~82-96% on all rows" otherwise (no per-row number).
PAPER_MIXED = {"single": 86.6}
PAPER_MIXED_BAND = (82.0, 96.0)
PAPER = {"finetune": PAPER_FINETUNE, "mixed": PAPER_MIXED}
# PAPER.md, "Celebrity / minority" (QA finetune): the minority's held-out QA without / with
# celebrities in pretraining.
PAPER_GROUPS = {"minority_only": {"minority": 4.4}, "celeb_minority": {"minority": 86.8}}
# PAPER.md, "BERT": GBERT extracts ~4% after QA finetune, ~30% with mixed training (no per-row
# number: shown beside every row). PAPER.md gives no Llama number.
ARCHS = ("gpt2", "gbert", "llama")
PAPER_GBERT = {"finetune": "~4", "mixed": "~30"}
DASH = "—"

# The keys the report reads and their JSON types; a dict: an object whose keys have those types.
NUMBER = (int, float)
ACCURACY = dict.fromkeys((*ATTRIBUTES, "mean"), NUMBER)   # an accuracy per attribute and mean
ACCURACIES = ("qa_test", "qa_train", "qa_valid", "bio_recall", "qprobe")
RESULT_TYPES = {**dict.fromkeys(ACCURACIES, ACCURACY),
                **dict.fromkeys((k + CI for k in (*ACCURACIES, "qa_test_by_tokens")), dict),
                "qa_test_by_tokens": dict, "groups": dict, "pprobe": list,
                "probe_baseline": dict, "evaluated_stage": str}
CONFIG_TYPES = {"name": str, "stages": (str, list),
                "finetune": {"lora_rank": int, "lora_embed_rank": int},
                "model": {"causal": bool, "block": str}}
JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
              int: "an integer", NUMBER: "a number", (str, list): "a string or a list"}


@dataclasses.dataclass
class Run:
  path: str
  label: str                       # unique, file-name safe (plots)
  name: str                        # data row (config name)
  mode: str | None                 # a MODES name | NO_QA | None (no config.json)
  config: dict
  results: dict
  notes: list[str]

  def metric(self, key: str, attr: str = "mean") -> float | None:
    v = self.results.get(key)
    v = v.get(attr) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) else None

  def ci(self, key: str, attr: str = "mean") -> dict | None:
    """The interval leaf {"lo", "hi", "n"} of metric(key, attr), if results.json has it."""
    v = self.results.get(key + CI)
    return v.get(attr) if isinstance(v, dict) else None

  def cell(self, key: str, attr: str = "mean") -> str:
    """metric(key, attr) as a percentage with its interval: `56.7 [54.2, 59.1]`."""
    return pct_ci(self.metric(key, attr), self.ci(key, attr))


def _check_types(obj: dict, types: dict, path: str, prefix: str = "") -> None:
  """ConfigError naming the file `path` and the key where a key of `types` that `obj` holds
  has a value of another JSON type (true is no number here)."""
  for key, want in types.items():
    if key not in obj:
      continue
    v, kind = obj[key], dict if isinstance(want, dict) else want
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
      raise ConfigError(f"{path}: key '{prefix}{key}' is {_json_text(v)}, expected "
                        f"{JSON_NAMES[kind]}")
    if isinstance(want, dict):
      _check_types(v, want, path, f"{prefix}{key}.")


def _json_text(v) -> str:
  """`v` as JSON, cut to 60 characters."""
  text = json.dumps(v)
  return text if len(text) <= 60 else text[:57] + "..."


def _read_json(path: str, notes: list[str], what: str, types: dict) -> dict:
  """The JSON object in `path`, its keys of `types` checked (_check_types); {} and a note `no
  {what}` where the file does not exist (a run not started or not evaluated yet). A file that
  is there but unreadable, not JSON, no object or of the wrong types is a one-line ConfigError
  naming it: the report would otherwise show a wrong number, or none, without saying why."""
  if not os.path.exists(path):
    notes.append(f"no {what}")
    return {}
  try:
    data = rundir.read_json(path)   # (a JSON object, or a ConfigError naming the file)
  except OSError as e:
    raise ConfigError(f"{path}: unreadable ({e.strerror or type(e).__name__})") from None
  _check_types(data, types, path)
  return data


def load_run(path: str, label: str, planned: dict | None = None) -> Run:
  """The run in `path`; `planned` ({"row", "method"} from a grid's grid.json) names its data
  row and training method while the run has no config.json yet."""
  notes: list[str] = []
  if planned and not os.path.isdir(path):
    notes.append("not started")
    cfg = {}
  else:
    cfg = _read_json(os.path.join(path, rundir.CONFIG), notes, rundir.CONFIG, CONFIG_TYPES)
  planned = planned or {}
  name = str(cfg.get("name") or planned.get("row") or os.path.basename(os.path.normpath(path)))
  # `--config.stages=a,b,c` is saved as ["a,b,c"]: split as configs/base.py's stage_list
  stages = base.split_stages(cfg.get("stages") or ())
  mode = base.qa_method(stages) if cfg else planned.get("method")
  ft = cfg.get("finetune", {})
  if mode == "finetune" and ft.get("lora_rank"):
    notes.append(f"LoRA finetune (r={ft['lora_rank']}, embedding r={ft.get('lora_embed_rank', 0)})")
  results = _read_json(os.path.join(path, rundir.RESULTS), notes,
                       f"{rundir.RESULTS} (not evaluated)", RESULT_TYPES)
  trained = [s for s in stages[:stages.index("eval")] if s in base.TRAIN_STAGES] \
      if "eval" in stages else []
  done = results.get("evaluated_stage")
  if trained and done and done != trained[-1]:   # an earlier run's eval: not this method's
    results = {k: v for k, v in results.items() if not k.startswith(EVAL_KEYS)}
    notes.append(f"QA evaluated after {done}, not after {trained[-1]}: rerun to evaluate")
  if results:
    missing = [k for k in ("qa_test", "qa_train", "bio_recall")
               if "mean" not in results.get(k, {})]
    if missing:
      notes.append("results.json lacks " + ", ".join(missing))
  return Run(path, label, name, mode, cfg, results, notes)


def modes_of(runs: list[Run]) -> tuple[str, ...]:
  """The headline columns: MODES, then NO_QA when some run has no QA training."""
  return MODES + ((NO_QA,) if any(r.mode == NO_QA for r in runs) else ())


def data_row(run: Run) -> str:
  """The paper row of a run: its config name, less a mix_/lora_ prefix naming the method."""
  for prefix in ("mix_", "mixed_", "lora_"):
    if run.name.startswith(prefix) and run.name[len(prefix):] in PAPER_FINETUNE:
      return run.name[len(prefix):]
  return run.name


def pct(v: float | None) -> str:
  return DASH if v is None else f"{100 * v:.1f}"


def pct_ci(v: float | None, ci=None) -> str:
  """pct(v), followed by its 95% interval `[lo, hi]` (%) when `ci` is an interval leaf
  (rundir.ci_bounds): `56.7 [54.2, 59.1]`."""
  b = rundir.ci_bounds(ci)
  if v is None or b is None:
    return pct(v)
  return f"{pct(v)} [{100 * b[0]:.1f}, {100 * b[1]:.1f}]"


def paper_pct(mode: str, row: str) -> str:
  v = PAPER.get(mode, {}).get(row)
  return DASH if v is None else f"{v:.1f}"


def _labels(paths: list[str]) -> list[str]:
  out, seen = [], {}
  for p in paths:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(p))) or "run"
    seen[base] = seen.get(base, 0) + 1
    out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
  return out


# -- markdown ----------------------------------------------------------------------------
def run_title(run: Run, runs: list[Run]) -> str:
  """A run's row title: its config name, plus its directory label when another run has the
  same name (e.g. one config run with two overrides)."""
  twins = sum(r.name == run.name for r in runs)
  return f"`{run.name}`" + (f" ({run.label})" if twins > 1 else "")


def joined_cells(mine: list[Run], key: str = "qa_test") -> str:
  """The `key` cells of the runs of one table cell (one data row and method), each with its
  directory label when there are several (a LoRA and a full finetune of one row, say);
  DASH when none."""
  if len(mine) < 2:
    return mine[0].cell(key) if mine else DASH
  return " / ".join(f"{r.cell(key)} ({r.label})" for r in mine)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def row_order(runs: list[Run]) -> list[str]:
  """Data rows in the paper's order, then the others in the order given."""
  names = []
  for r in runs:
    if data_row(r) not in names:
      names.append(data_row(r))
  known = [n for n in PAPER_FINETUNE if n in names]
  return known + [n for n in names if n not in PAPER_FINETUNE]


def headline_table(runs: list[Run]) -> list[str]:
  rows, modes = [], modes_of(runs)
  for row in row_order(runs):
    cells = [f"`{row}`"]
    for mode in modes:
      mine = [r for r in runs if data_row(r) == row and r.mode == mode]
      cells.append(joined_cells(mine) + (f" ({paper_pct(mode, row)})" if mode in PAPER else ""))
    rows.append(cells)
  return _table(["data", "QA finetune: ours (paper)", "mixed training: ours (paper)",
                 *([f"{NO_QA}: ours"] if NO_QA in modes else [])], rows)


def row_run(runs: list[Run], row: str, mode: str) -> Run | None:
  """The last run of data row `row` trained by `mode` (a `modes_of` name) that has a
  held-out QA number (what the chart and the ordering count for the row; the tables label
  each of several runs of one cell, `joined_cells`, and `ordering_line` says which counted)."""
  got = [r for r in runs
         if data_row(r) == row and r.mode == mode and r.metric("qa_test") is not None]
  return got[-1] if got else None


def _ranks(v):
  """Ranks 1..n of `v`, ties sharing their mean rank."""
  import numpy as np
  v = np.asarray(v, float)
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(1, len(v) + 1)
  for x in np.unique(v):
    ranks[v == x] = ranks[v == x].mean()
  return ranks


def paper_ordering(runs: list[Run], mode: str = "finetune") -> dict | None:
  """How our held-out QA orders the data rows against the paper's numbers (`mode` column,
  rows with both; the last run of a row counts): Spearman's rho (ties at mean rank), and
  of the row pairs the paper orders strictly, how many ours orders the same way. None under
  3 rows."""
  import numpy as np
  pairs = [(row, 100 * run.metric("qa_test"), PAPER[mode][row]) for row in row_order(runs)
           if row in PAPER[mode] and (run := row_run(runs, row, mode))]
  if len(pairs) < 3:
    return None
  ours, paper = np.array([p[1] for p in pairs]), np.array([p[2] for p in pairs])
  ro, rp = _ranks(ours) - (len(pairs) + 1) / 2, _ranks(paper) - (len(pairs) + 1) / 2
  denom = np.sqrt((ro ** 2).sum() * (rp ** 2).sum())
  i, j = np.triu_indices(len(pairs), 1)
  strict = paper[i] != paper[j]
  same = np.sign(ours[i] - ours[j]) == np.sign(paper[i] - paper[j])
  return {"rows": len(pairs), "spearman": float((ro * rp).sum() / denom) if denom else None,
          "pairs": int(strict.sum()), "pairs_same": int((same & strict).sum())}


def ordering_line(runs: list[Run]) -> list[str]:
  o = paper_ordering(runs)
  if o is None:
    return []
  rho = DASH if o["spearman"] is None else f"{o['spearman']:.2f}"
  several = [f"`{row}`: {r.label}" for row in row_order(runs)
             if (r := row_run(runs, row, "finetune"))
             and sum(data_row(x) == row and x.mode == "finetune" for x in runs) > 1]
  return ["", f"Ordering against the paper (QA finetune, the {o['rows']} rows with both "
              f"numbers): Spearman's rho {rho}; {o['pairs_same']} of the {o['pairs']} row pairs "
              f"the paper orders are ordered the same way here."
              + (f" Of a row's several runs, the chart and this count the last: "
                 f"{', '.join(several)}." if several else "")]


def detail_table(runs: list[Run]) -> list[str]:
  """A row per run; a `QA valid` column when some run held QA-train people back
  (data.qa_valid_fraction: results.json `qa_valid`)."""
  valid = any(r.metric("qa_valid") is not None for r in runs)
  rows = []
  for r in sorted(runs, key=lambda r: (row_order(runs).index(data_row(r)), str(r.mode))):
    mode = r.mode or "?"
    paper = paper_pct(r.mode, data_row(r)) if r.mode else DASH
    rows.append([run_title(r, runs), mode, f"{r.cell('qa_test')} ({paper})",
                 *[r.cell("qa_test", a) for a in ATTRIBUTES],
                 r.cell("qa_train"), *([r.cell("qa_valid")] if valid else []),
                 r.cell("bio_recall"), "; ".join(r.notes) or ""])
  header = ["run", "training", "QA test (paper)", *[f"test {ATTR_SHORT[a]}" for a in ATTRIBUTES],
            "QA train half", *(["QA valid"] if valid else []), "bio recall", "notes"]
  return _table(header, rows)


def group_table(runs: list[Run]) -> list[str]:
  """Held-out QA per group (results.json `groups`) of the runs that have groups: a row per
  run, a column per group name, the paper's number in parentheses; [] if no run has groups."""
  grouped = [r for r in runs if isinstance(r.results.get("groups"), dict)]
  names = sorted({g for r in grouped for g in r.results["groups"]})

  def cell(r: Run, g: str) -> str:
    entry = r.results["groups"].get(g)
    entry = entry if isinstance(entry, dict) else {}
    test, ci = entry.get("qa_test"), entry.get("qa_test" + CI)
    mean = test.get("mean") if isinstance(test, dict) else None
    ci = ci.get("mean") if isinstance(ci, dict) else None
    paper = PAPER_GROUPS.get(data_row(r), {}).get(g) if r.mode == "finetune" else None
    return (f"{pct_ci(mean if isinstance(mean, (int, float)) else None, ci)} "
            f"({DASH if paper is None else f'{paper:.1f}'})")

  rows = [[run_title(r, grouped), r.mode or "?", *[cell(r, g) for g in names]] for r in grouped]
  return _table(["run", "training", *[f"`{g}` held-out QA (paper)" for g in names]],
                rows) if rows else []


def arch_of(run: Run) -> str:
  """'gbert' (model.causal false), 'llama' (model.block llama) or 'gpt2'."""
  model = run.config.get("model", {})
  if model.get("causal") is False:
    return "gbert"
  return "llama" if model.get("block") == "llama" else "gpt2"


def arch_row(run: Run) -> str:
  """The data row of a run of any architecture (configs/<arch>/<row>.py names it <arch>_<row>)."""
  arch = arch_of(run)
  name = run.name[len(arch) + 1:] if run.name.startswith(arch + "_") else run.name
  return data_row(dataclasses.replace(run, name=name))


def arch_paper(arch: str, mode: str, row: str) -> str:
  if arch == "gbert":
    return PAPER_GBERT.get(mode, DASH)
  return paper_pct(mode, row) if arch == "gpt2" else DASH


def arch_table(runs: list[Run]) -> list[str]:
  """GPT vs GBERT vs Llama: a row per data row, a column per (architecture, training), held-out
  QA "ours (paper)"; [] unless some run is not GPT-2."""
  archs = [a for a in ARCHS if any(arch_of(r) == a for r in runs)]
  if archs == ["gpt2"]:
    return []
  rows, modes = [], modes_of(runs)
  names = list(dict.fromkeys(arch_row(r) for r in runs))
  for row in [n for n in PAPER_FINETUNE if n in names] + [n for n in names
                                                           if n not in PAPER_FINETUNE]:
    cells = [f"`{row}`"]
    for arch in archs:
      for mode in modes:
        mine = [r for r in runs if arch_row(r) == row and arch_of(r) == arch and r.mode == mode]
        cells.append(f"{joined_cells(mine)} ({arch_paper(arch, mode, row)})")
    rows.append(cells)
  return _table(["data", *[f"{a} {m}: ours (paper)" for a in archs for m in modes]], rows)


def token_table(runs: list[Run]) -> list[str]:
  """Held-out QA of single-token vs multi-token answers (results.json `qa_test_by_tokens`):
  per attribute "single / multi" accuracy (with intervals where recorded), the share of
  multi-token answers beside it."""
  rows = []
  for r in runs:
    by = r.results.get("qa_test_by_tokens")
    if not isinstance(by, dict):
      continue
    by_ci = r.results.get("qa_test_by_tokens" + CI)
    by_ci = by_ci if isinstance(by_ci, dict) else {}

    def cell(key):
      d = by.get(key) if isinstance(by.get(key), dict) else {}
      if not d:
        return DASH
      d_ci = by_ci.get(key) if isinstance(by_ci.get(key), dict) else {}
      get = lambda k: d.get(k) if isinstance(d.get(k), (int, float)) else None
      share = get("multi_share")
      return (f"{pct_ci(get('single'), d_ci.get('single'))} / "
              f"{pct_ci(get('multi'), d_ci.get('multi'))}"
              + (f" ({100 * share:.0f}% multi)" if share is not None else ""))

    rows.append([run_title(r, runs), arch_of(r), r.mode or "?", *[cell(a) for a in ATTRIBUTES],
                 cell("all")])
  if not rows:
    return []
  return _table(["run", "arch", "training", *[ATTR_SHORT[a] for a in ATTRIBUTES], "all"], rows)


def qprobe_table(runs: list[Run]) -> list[str]:
  rows = []
  for r in runs:
    q = r.results.get("qprobe")
    if not isinstance(q, dict):
      continue
    val = lambda a: r.cell("qprobe", a) if isinstance(q.get(a), (int, float)) else DASH
    mean = q.get("mean")
    if not isinstance(mean, (int, float)):
      vals = [q[a] for a in ATTRIBUTES if isinstance(q.get(a), (int, float))]
      mean = sum(vals) / len(vals) if vals else None
      mean_cell = pct(mean)
    else:
      mean_cell = r.cell("qprobe")
    rows.append([f"`{r.name}` ({r.mode or '?'})", *[val(a) for a in ATTRIBUTES], mean_cell])
  if not rows:
    return []
  return _table(["run", *[ATTR_SHORT[a] for a in ATTRIBUTES], "mean"], rows)


def pprobe_matrix(run: Run):
  import numpy as np
  p = run.results.get("pprobe")
  try:
    m = np.asarray(p, np.float64)
  except (TypeError, ValueError):
    return None
  return m if m.ndim == 2 and m.size else None


# -- plots -------------------------------------------------------------------------------
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def png_bytes(plt, fig) -> bytes:
  """The figure as PNG bytes (closed): the report writes its files once all are drawn."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def plot_accuracy(runs: list[Run]) -> bytes:
  import numpy as np
  plt = _plt()
  rows = row_order(runs)
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.8))
  modes = modes_of(runs)
  width = 0.76 / len(modes)
  for k, mode in enumerate(modes):
    at = x + (k - (len(modes) - 1) / 2) * width
    vals, err = [], []   # the bar, and its 95% interval as (below, above) where recorded
    for row in rows:
      run = row_run(runs, row, mode)
      v = 100 * run.metric("qa_test") if run else np.nan
      b = rundir.ci_bounds(run.ci("qa_test")) if run else None
      lo, hi = (100 * b[0], 100 * b[1]) if b else (v, v)
      vals.append(v)
      err.append((v - lo, hi - v))
    ax.bar(at, vals, width, label=f"ours, {mode}", color=MODE_COLORS[mode],
           yerr=np.array(err).T, error_kw=dict(elinewidth=0.8, capsize=2, ecolor="0.3"))
    paper = [PAPER.get(mode, {}).get(row, np.nan) for row in rows]
    ax.scatter(at, paper, marker="_", s=300, color="black", zorder=3,
               label="paper" if k == 0 else None)
    if mode == "mixed":   # the paper's band on its rows without a number (our runs only)
      band = [i for i, (row, v) in enumerate(zip(rows, vals))
              if row in PAPER_FINETUNE and row not in PAPER_MIXED and not np.isnan(v)]
      ax.vlines(at[band], *PAPER_MIXED_BAND, color="0.7", lw=5, zorder=0,
                label="paper, mixed: ~82–96 (rows without a number)" if band else None)
  ax.set_xticks(x, rows, rotation=30, ha="right")
  ax.set_ylim(0, 100)
  ax.set_ylabel("held-out QA exact match (%)")
  ax.set_title("QA accuracy on people never seen in QA (bars: 95% interval)")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  return png_bytes(plt, fig)


def plot_qprobe_vs_qa(runs: list[Run]) -> bytes:
  """One point per run: Q-probe mean accuracy (x) against held-out QA accuracy (y)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.6, 4.0))
  for r in runs:
    q, qa = r.metric("qprobe"), r.metric("qa_test")
    if q is None or qa is None:
      continue
    ax.scatter(100 * q, 100 * qa, s=40)
    ax.annotate(r.name, (100 * q, 100 * qa), fontsize=8, xytext=(4, 4),
                textcoords="offset points")
  ax.set_xlim(0, 100)
  ax.set_ylim(0, 100)
  ax.set_xlabel("Q-probe accuracy from the name alone (%)")
  ax.set_ylabel("held-out QA exact match (%)")
  ax.set_title("Q-probe (name only) vs held-out QA")
  fig.tight_layout()
  return png_bytes(plt, fig)


def read_losses(run: Run) -> dict[str, tuple[list[int], list[float]]]:
  out = {}
  for stage in TRAINED_STAGES:
    steps, losses = [], []
    for row in rundir.read_metrics(rundir.metrics_file(rundir.stage_dir(run.path, stage))):
      if isinstance(row.get("loss"), (int, float)):
        steps.append(row.get("step", len(steps)))
        losses.append(row["loss"])
    if steps:
      out[stage] = (steps, losses)
  return out


def plot_losses(run: Run, curves) -> bytes:
  """A panel per stage. Drawn at a fixed layout with plain-text tick labels: tight_layout and
  the log axis's mathtext labels were ~2/3 of a 32-run grid's report (13.8 -> 4.6 CPU-s)."""
  plt = _plt()
  from matplotlib import ticker
  fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.0), squeeze=False)
  fig.subplots_adjust(left=0.8 / (3.6 * len(curves)), right=0.97, bottom=0.16, top=0.8,
                      wspace=0.35)   # 0.8 in for the y labels
  for ax, (stage, (steps, losses)) in zip(axes[0], curves.items()):
    ax.plot(steps, losses, lw=1.2)
    if min(losses) > 0:
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(ticker.LogFormatter())   # matplotlib's choice of labels,
      ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))   # as text
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
  fig.suptitle(f"{run.name} ({run.mode or '?'})")
  return png_bytes(plt, fig)


def plot_pprobe(run: Run, m) -> bytes:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.2, 4.8))
  im = ax.imshow(100 * m, vmin=0, vmax=100, cmap="viridis")
  cols = list(ATTRIBUTES[:m.shape[1]]) + [str(j) for j in range(len(ATTRIBUTES), m.shape[1])]
  base = run.results.get("probe_baseline") or {}   # majority class: what "above chance" means
  cols = [c.replace("_", "\n", 1) + (f"\n[{100 * base[c]:.1f}]"
                                     if isinstance(base.get(c), (int, float)) else "")
          for c in cols]
  ax.set_xticks(range(m.shape[1]), cols, fontsize=7)
  ax.set_yticks(range(m.shape[0]), [f"position {i + 1}" for i in range(m.shape[0])])
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center", fontsize=8,
              color="white" if m[i, j] < 0.6 else "black")
  ax.set_xlabel("attribute predicted [majority baseline %]")
  ax.set_ylabel("probed position (before the k-th sentence's value)")
  ax.set_title(f"P-probe accuracy (%): {run.name}")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  return png_bytes(plt, fig)


# -- the report --------------------------------------------------------------------------
def section(title: str, intro: str, table: list[str]) -> list[str]:
  """A markdown section: title, an optional intro paragraph, the table; [] if no table."""
  return ["", title, "", *([intro, ""] if intro else []), *table] if table else []


def expand_grids(dirs: list[str]) -> list[tuple[str, dict | None]]:
  """[(run directory, planned)]: a grid directory (it holds grid.json) stands for its runs in
  the grid's order, each with its planned row and method (a run not started yet is listed,
  not an error); any other directory is one run, and must hold one (a config.json or a
  results.json: an empty or mistyped directory rendered an empty report)."""
  out = []
  for d in dirs:
    if not os.path.isdir(d):
      raise ConfigError(f"{d}: no such run directory")
    path = os.path.join(d, rundir.GRID)
    if not os.path.exists(path):
      if not any(os.path.exists(os.path.join(d, f)) for f in (rundir.CONFIG, rundir.RESULTS)):
        raise ConfigError(f"{d}: holds no run (no {rundir.CONFIG}, {rundir.RESULTS} or "
                          f"{rundir.GRID})")
      out.append((d, None))
      continue
    try:
      runs = rundir.read_json(path)["runs"]
      out += [(os.path.join(d, r["name"]), {"row": r["row"], "method": r["method"]})
              for r in runs]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{path}: unreadable grid file ({type(e).__name__}: {e})") from None
  return out


def render_report(run_dirs: list[str], stem: str) -> tuple[str, dict[str, bytes]]:
  """(markdown, {PNG file name: its bytes}) of the runs in `run_dirs` (a grid directory stands
  for its runs: `expand_grids`), the PNGs named `<stem>_<kind>[_<run>].png`. Writes nothing."""
  planned = expand_grids(run_dirs)
  paths = [p for p, _ in planned]
  runs = [load_run(p, label, plan) for (p, plan), label in zip(planned, _labels(paths))]
  pngs: dict[str, bytes] = {}

  def png(kind: str, label: str | None, data: bytes) -> str:
    name = f"{stem}_{kind}" + (f"_{label}" if label else "") + ".png"
    pngs[name] = data
    return name

  md = ["# Knowledge extraction report", "",
        "Held-out QA exact match (%, mean over the six attributes) on people whose QA was "
        "never trained on; the paper's number in parentheses (PAPER.md, Allen-Zhu & Li 2023, "
        "Fig. 3; mixed training: 86.6 for `single`, ~82–96 on the other rows, no per-row "
        "number). In brackets after our numbers: the 95% Wilson score interval (results.json "
        "`<key>_ci`), where the run recorded one.", ""]
  md += headline_table(runs)
  md += ordering_line(runs)
  acc_png = png("accuracy", None, plot_accuracy(runs))
  md += ["", f"![held-out QA accuracy]({acc_png})", "", "## Per run", "",
         "Test = held-out half; train half = people whose QA was trained on; bio recall = "
         "teacher-forced exact match of each value inside held-out people's bios (storage: is "
         "the fact in the model at all?); QA valid (when present) = QA-train people held back "
         "from training for tuning (`data.qa_valid_fraction`).", ""]
  md += detail_table(runs)
  md += section("## Groups (celebrity / minority)",
                "Held-out QA (%) of each group's people whose QA was never trained on (a "
                "minority's: all of them); paper (PAPER.md): the minority's 4.4 without "
                "celebrities (`minority_only`), 86.8 with them (`celeb_minority`; our "
                "celebrities: `star`).", group_table(runs))
  md += section("## GPT vs GBERT vs Llama",
                "Held-out QA (%) by architecture; paper (PAPER.md): GPT-2 as in the headline "
                "table, GBERT ~4 finetune / ~30 mixed (no per-row number), Llama none given.",
                arch_table(runs))
  md += section("## Single-token vs multi-token answers",
                "Held-out QA (%) of answers whose value is one model token / several (EOT not "
                "counted); in parentheses the share of multi-token answers. Birth dates are "
                "always multi-token; the paper's GBERT fails on multi-token answers such as "
                "\"Meta Platforms\".", token_table(runs))
  q = qprobe_table(runs)
  md += section("## Q-probe (name only → attribute), accuracy %", "", q)
  if q:
    md += ["", f"![Q-probe vs QA]({png('qprobe_vs_qa', None, plot_qprobe_vs_qa(runs))})"]

  def per_run(title: str, kind: str, items, plot, caption) -> list[str]:
    """A section with one PNG per run that has data; [] if none has."""
    items = [(r, d) for r, d in items if d is not None and len(d)]
    out = ["", title, ""] if items else []
    for r, d in items:
      out += [caption(r, d, png(kind, r.label, plot(r, d))), ""]
    return out

  md += per_run("## P-probe (rows: positions, columns: attributes)", "pprobe",
                [(r, pprobe_matrix(r)) for r in runs], plot_pprobe,
                lambda r, m, name: f"`{r.name}` ({r.mode or '?'}): ![P-probe {r.name}]({name})")
  md += per_run("## Training loss", "loss", [(r, read_losses(r)) for r in runs], plot_losses,
                lambda r, c, name: f"`{r.name}` ({r.mode or '?'}, {', '.join(c)}): "
                                   f"![loss {r.name}]({name})")
  return "\n".join(md).rstrip() + "\n", pngs


def write_files(files: dict[str, bytes], out: str) -> None:
  """Write `files` ({path: bytes}, in --out's directory) all or none: each to a temporary
  file first, renamed over its path once all are written. An OSError (an --out under a file
  or in a directory this process cannot write, a full disk) removes the temporary files and
  the directories made for them, and is one line naming --out."""
  suffix = f".{os.getpid()}.tmp"
  made, d = [], os.path.dirname(os.path.abspath(out))   # made: missing directories, deepest first
  while not os.path.exists(d):
    made.append(d)
    d = os.path.dirname(d)
  tmps = []
  try:
    os.makedirs(made[0] if made else d, exist_ok=True)
    for path, data in files.items():
      tmps.append(path + suffix)
      with open(tmps[-1], "wb") as f:
        f.write(data)
    for tmp, path in zip(tmps, files):
      os.replace(tmp, path)
  except OSError as e:
    for p in tmps + made:
      if os.path.isfile(p):
        os.remove(p)
      elif os.path.isdir(p):
        os.rmdir(p)
    raise ConfigError(f"--out={out}: cannot write {str(e.filename or out).removesuffix(suffix)} "
                      f"({e.strerror or type(e).__name__})") from None


def build_report(run_dirs: list[str], out_path: str) -> tuple[str, list[str]]:
  """Render the report (`render_report`), then write the markdown to `out_path` and the PNGs
  beside it; (markdown, PNG paths). A failure writes nothing."""
  out_dir = os.path.dirname(os.path.abspath(out_path))
  text, pngs = render_report(run_dirs, os.path.splitext(os.path.basename(out_path))[0])
  paths = {os.path.join(out_dir, name): data for name, data in pngs.items()}
  write_files({out_path: text.encode(), **paths}, out_path)
  return text, list(paths)


def main(argv):
  run_dirs = argv[1:]
  if not run_dirs:
    raise ConfigError("expected one or more RUN_DIR (or grid directory) arguments")
  out = OUT.value   # checked before any PNG is drawn beside it
  if not out or out.endswith(os.sep) or os.path.isdir(out):
    raise ConfigError(f"--out={out!r}: expected a markdown file path (PNGs go beside it)")
  text, pngs = build_report(run_dirs, out)
  print(text, end="")
  print(f"\nwrote {OUT.value} and {len(pngs)} PNG files", file=sys.stderr)


def run() -> None:
  """`python -m kstore_jax.report` (the shim kstore_jax/report.py calls this)."""
  cli.run(main, "kstore_jax.report", config_required=False)
