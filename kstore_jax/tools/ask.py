r"""Ask a trained model about people of its population, or complete free text.

    python -m kstore_jax.ask --workdir=DIR --name="First Middle Last" [--attribute=university]
    python -m kstore_jax.ask --workdir=DIR --person=17 | --random=5 [--seed=0] [--split=test]
    python -m kstore_jax.ask --workdir=DIR --prompt="Anya Briar Forger was born on" [--max_new=32]

Loads the final params of a finished stage (`--stage`; default: the latest finished of
finetune, pretrain_mixed, pretrain), asks the QA questions the evaluation asks (the same
prompts, greedy decoding with the KV cache, exact match of the answer tokens and EOT) and
prints each question, the model's answer, the ground truth from the population and ✓/✗,
and the person's QA split as the eval stage counts it: training data (the train half), held
back for tuning (valid: `data.qa_valid_fraction` > 0; neither trained on nor test) or held
out (the test half). `--split=train|valid|test` draws `--random` from one of them.
`--prompt` completes free text instead (greedy, up to `--max_new` tokens, stopping at the
end-of-text token); `\n` in it stands for a newline, as in the QA prompts ("?\nAnswer:"). A
prompt is a document's beginning (it follows an end-of-text token): a QA question as is, any
other text with a leading space added, as bios start (" Anya Briar Forger was born on").

Read-only: it takes no lock. Errors are one line on stderr, exit status 2.
"""

import json
import os
import sys

from absl import flags, logging

from configs.base import TRAIN_STAGES
from kstore_jax import rundir
from kstore_jax.configlib import ConfigError
from kstore_jax.tools import cli

FINISHED_ORDER = TRAIN_STAGES[::-1]   # preferred first: finetune, pretrain_mixed, pretrain
# A person's QA split, as results.json's qa_train / qa_valid / qa_test count people.
SPLIT_LABELS = {"train": "QA in training (train half)", "valid": "QA held back for tuning (valid)",
                "test": "QA held out (test half)"}

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (as given to kstore_jax.main).")
_NAME = flags.DEFINE_string("name", None, 'Full name of a person, e.g. "Anya Briar Forger".')
_PERSON = flags.DEFINE_integer("person", None, "Index of a person in the population.")
_RANDOM = flags.DEFINE_integer("random", None, "Ask about this many random people.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of --random.", lower_bound=0)
_SPLIT = flags.DEFINE_enum("split", "all", ["all", *SPLIT_LABELS],
                           "--random draws from: all people, the QA-train half, the QA-valid "
                           "people (held back for tuning), or the held-out (test) half.")
_ATTRIBUTE = flags.DEFINE_string("attribute", None, "Attribute(s) to ask, comma-separated "
                                 "(default: all six).")
_STAGE = flags.DEFINE_string("stage", None, "Stage whose final params to use (default: the "
                             "latest finished of finetune, pretrain_mixed, pretrain).")
_PROMPT = flags.DEFINE_string("prompt", None, "Free text to complete instead of asking QA.")
_MAX_NEW = flags.DEFINE_integer("max_new", 32, "--prompt: at most this many new tokens.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


# -- loading ----------------------------------------------------------------------------------
def load_run(workdir: str):
  """(cfg, tokenizer) of a finished or running workdir, without touching it: its
  tokenizer.json and its config.json as `run_config` reads it."""
  from kstore_jax.data import tokenizer as tokenizer_lib
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: no such directory")
  for name in (rundir.CONFIG, rundir.TOKENIZER):
    if not os.path.isfile(os.path.join(workdir, name)):
      raise ConfigError(f"--workdir={workdir}: no {name} (not a kstore_jax run?)")
  path = os.path.join(workdir, rundir.CONFIG)
  try:
    saved = rundir.read_json(path)
    tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, rundir.TOKENIZER))
  except ConfigError:
    raise
  except (OSError, ValueError) as e:
    raise ConfigError(f"--workdir={workdir}: {type(e).__name__}: {e}") from None
  return run_config(saved, path), tok


def run_config(saved: dict, path: str):
  """The config `saved` (a run's config.json, read from `path`) as main runs it: keys it lacks
  (a run written before they existed) at their configs/base.py defaults for its scale and
  variants, as a resume takes them; the mesh this process's own (data-parallel over its
  devices: the training mesh may not fit them); validated as main validates a config, for
  this platform and one device (ask trains nothing: a batch size this host's devices do not
  divide is no concern of it). ConfigError naming the file and the first bad key (a
  hand-edited value of another type, a section that is no section)."""
  import jax
  import ml_collections
  from configs import base
  from kstore_jax.model import attention
  try:
    scale, variants = saved.get("scale"), saved.get("variants", "")
    if scale not in tuple(base.SCALES):
      raise ConfigError(f"config key 'scale'={scale!r} must be {'|'.join(base.SCALES)}")
    if not isinstance(variants, str):
      raise ConfigError(f"config key 'variants'={variants!r} must be a string")
    with cli.config_errors():   # an unknown variant
      defaults = base.get_config(",".join(filter(None, (scale, variants)))).to_dict()
      cfg = ml_collections.ConfigDict(_merged(defaults, {k: v for k, v in saved.items()
                                                         if k != "mesh"}))
    cli.validated_config(cfg, platform=attention.platform_of(jax.devices()))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return cfg


def _merged(defaults: dict, saved: dict) -> dict:
  """`saved` over `defaults`, section by section."""
  return {**defaults, **{k: _merged(defaults[k], v) if isinstance(v, dict)
                         and isinstance(defaults.get(k), dict) else v for k, v in saved.items()}}


def pick_stage(workdir: str, stage: str | None) -> str:
  def done(s):
    return rundir.is_done(rundir.stage_dir(workdir, s))
  if stage is not None:
    if stage not in FINISHED_ORDER:
      raise ConfigError(f"--stage={stage}: expected one of {', '.join(FINISHED_ORDER)}")
    if not done(stage):
      raise ConfigError(f"--stage={stage}: not finished in {workdir} (no {stage}/final/)")
    return stage
  for s in FINISHED_ORDER:
    if done(s):
      return s
  raise ConfigError(f"--workdir={workdir}: no finished stage (none of "
                    f"{', '.join(s + '/final/' for s in FINISHED_ORDER)})")


class Asker:
  """A run's world, model and final params of one stage."""

  def __init__(self, workdir: str, stage: str | None = None):
    from kstore_jax import experiment
    self.workdir = os.path.abspath(workdir)
    cfg, tok = load_run(self.workdir)
    self.stage = pick_stage(self.workdir, stage)
    self.exp = experiment.Experiment(cfg, tok, experiment.Workdir(self.workdir))
    self.world, self.model = self.exp.world, self.exp.model
    self.exp.workdir.check_same_world(cfg, self.world)   # its answers against other facts
    try:
      self.params = self.exp.load_final(self.stage)
    except Exception as e:  # a damaged final/ (orbax raises many types), or another model's
      raise ConfigError(f"{self.stage}/final in {self.workdir} is unreadable or not the model "
                        f"{rundir.CONFIG} describes ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200]})") from None

  # -- people ------------------------------------------------------------------------------
  def person_by_name(self, name: str) -> int:
    try:
      return self.world.pop.find(" ".join(name.split()))
    except KeyError:
      raise ConfigError(f"--name={name!r}: no person with this name among the "
                        f"{len(self.world.pop)} people of this run") from None

  def check_person(self, person: int) -> int:
    n = len(self.world.pop)
    if not 0 <= person < n:
      raise ConfigError(f"--person={person}: out of range (this run has {n} people: 0..{n - 1})")
    return person

  def split_of(self, person: int) -> str:
    """The person's QA split (a SPLIT_LABELS key)."""
    w = self.world
    return "train" if w.qa_train[person] else "valid" if w.qa_valid[person] else "test"

  def random_people(self, k: int, seed: int, split: str = "all"):
    import numpy as np
    w = self.world
    pool = {"all": np.arange(len(w.pop)), "train": w.train_people, "valid": w.valid_people,
            "test": w.test_people}[split]
    if k < 1:
      raise ConfigError(f"--random={k}: must be >= 1")
    if not len(pool):
      raise ConfigError(f"--split={split}: this run has no {split} people"
                        + (" (see data.qa_valid_fraction)" if split == "valid" else ""))
    k = min(k, len(pool))
    return [int(p) for p in np.random.default_rng(seed).choice(pool, size=k, replace=False)]

  # -- QA ----------------------------------------------------------------------------------
  def ask(self, people, attributes=None) -> list[dict]:
    """One record per (person, attribute): question, model answer, truth, correct."""
    import numpy as np
    from kstore_jax.data.templates import ATTRIBUTES
    from kstore_jax.eval import qa_eval
    attributes = list(ATTRIBUTES) if attributes is None else list(attributes)
    w, r = self.world, self.world.renderer
    people = np.asarray(people, np.int64)
    qs = qa_eval.qa_set(w, people)
    keep = np.flatnonzero(np.isin(qs.attrs_N, [ATTRIBUTES.index(a) for a in attributes]))
    qs = qs.take(keep)
    prompts, plens = qs.prompts(w.pad_id)
    answers, alens, attrs = qs.answers_NW, qs.alens_N, qs.attrs_N
    who = np.repeat(people, len(ATTRIBUTES))[keep]
    max_new = answers.shape[1] + 4   # room to show a wrong, longer answer
    gen = qa_eval.answer(self.model, self.params, w, qs, max_new)
    correct = qa_eval.answers_match(gen, answers, alens)
    out = []
    for i in range(len(prompts)):
      person, attr = int(who[i]), ATTRIBUTES[int(attrs[i])]
      question = r.decode(prompts[i, 1:plens[i]])   # without the leading EOT
      out.append({
          "person": person, "name": w.pop.full_name(person),
          "qa_split": self.split_of(person),
          "attribute": attr, "question": question,
          "answer": self._until_eot(gen[i]).strip(),
          "truth": w.pop.values(person)[attr], "correct": bool(correct[i])})
    return out

  def _until_eot(self, ids) -> str:
    import numpy as np
    ids = np.asarray(ids)
    stop = np.flatnonzero(ids == self.world.renderer.eot_id)
    return self.world.renderer.decode(ids[:stop[0]] if len(stop) else ids)

  # -- free text ---------------------------------------------------------------------------
  def complete(self, text: str, max_new: int) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from kstore_jax.eval.generate import generate
    from kstore_jax.data.templates import QUESTIONS
    if not self.model.cfg.causal:
      raise ConfigError("--prompt: free-text completion needs a causal model; a bidirectional "
                        "(GBERT) run answers by mask filling: use --name or --random")
    r = self.world.renderer
    # A document is EOT + a QA question ("What is ...") or EOT + a bio, which starts with
    # " Name": every name piece carries its leading space. Give other prompts that space too,
    # so that a name tokenizes as in training (without it, BPE splits it into odd pieces).
    as_is = (not text or text[:1].isspace()
             or any(text.startswith(q) for q, _ in QUESTIONS.values()))
    candidates = [text] if as_is else [" " + text, text]
    for fed in candidates:
      try:
        ids = r.encode(fed)
        break
      except ValueError as e:
        error = e
    else:
      raise ConfigError(f"--prompt: {error}")
    ids = np.concatenate([[r.eot_id], ids]).astype(np.int32)   # documents start with EOT
    gen = np.asarray(generate(self.model, self.params, jnp.asarray(ids[None]),
                              jnp.asarray([len(ids)], np.int32), max_new))[0]
    stop = np.flatnonzero(gen == r.eot_id)
    return {"prompt": text, "model_prompt": fed, "completion": self._until_eot(gen),
            "new_tokens": int(stop[0]) if len(stop) else int(max_new),
            "stopped_at_eot": bool(len(stop))}


# -- the CLI ----------------------------------------------------------------------------------
def _attributes(spec: str | None):
  from kstore_jax.data.templates import ATTRIBUTES
  if spec is None:
    return None
  names = [a.strip() for a in spec.split(",") if a.strip()]
  for a in names:
    if a not in ATTRIBUTES:
      raise ConfigError(f"--attribute={a}: unknown attribute; expected one of "
                        f"{', '.join(ATTRIBUTES)}")
  if not names:
    raise ConfigError("--attribute: empty")
  return names


def format_records(records, stage: str) -> str:
  lines, last = [], None
  for rec in records:
    if rec["person"] != last:
      last = rec["person"]
      split = SPLIT_LABELS[rec["qa_split"]]
      lines.append(f"{rec['name']}  (person {rec['person']}, {split}; model: {stage}/final)")
    q = rec["question"].split("\n")[0]
    mark = "✓" if rec["correct"] else "✗"
    lines.append(f"  {mark} {rec['attribute']:<13} Q: {q}")
    lines.append(f"    {'':<13} model: {rec['answer']!s:<28} truth: {rec['truth']}")
  n_ok = sum(r["correct"] for r in records)
  lines.append(f"{n_ok}/{len(records)} correct")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument {argv[1]!r}")
  if not _WORKDIR.value:
    raise ConfigError("--workdir is required")
  chosen = [f for f, v in (("--name", _NAME.value), ("--person", _PERSON.value),
                           ("--random", _RANDOM.value), ("--prompt", _PROMPT.value))
            if v is not None]
  if len(chosen) != 1:
    raise ConfigError("give exactly one of --name, --person, --random, --prompt"
                      + (f" (got {', '.join(chosen)})" if chosen else ""))
  for flag, modes in (("split", ("--random",)), ("seed", ("--random",)),
                      ("max_new", ("--prompt",)), ("attribute", ("--name", "--person", "--random"))):
    if flags.FLAGS[flag].present and chosen[0] not in modes:
      raise ConfigError(f"--{flag} goes with {' or '.join(modes)}, not {chosen[0]} (it would "
                        "be ignored)")
  for flag, value in (("--name", _NAME.value), ("--prompt", _PROMPT.value)):
    if value is not None and not value.strip():   # (an empty shell variable, say)
      raise ConfigError(f"{flag}= is empty")
  if not 1 <= _MAX_NEW.value <= 4096:
    raise ConfigError(f"--max_new={_MAX_NEW.value}: must be in [1, 4096]")
  attributes = _attributes(_ATTRIBUTE.value)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  asker = Asker(_WORKDIR.value, _STAGE.value)
  if _PROMPT.value is not None:
    res = asker.complete(_PROMPT.value.replace("\\n", "\n"), _MAX_NEW.value)
    res["stage"] = asker.stage
    if _JSON.value:
      print(json.dumps(res))
    else:
      print(res["model_prompt"] + res["completion"])
      print(f"[{asker.stage}/final: {res['new_tokens']} new tokens"
            + (", stopped at end of text]" if res["stopped_at_eot"] else "]"))
    return
  if _NAME.value is not None:
    people = [asker.person_by_name(_NAME.value)]
  elif _PERSON.value is not None:
    people = [asker.check_person(_PERSON.value)]
  else:
    people = asker.random_people(_RANDOM.value, _SEED.value, _SPLIT.value)
  records = asker.ask(people, attributes)
  if _JSON.value:
    print(json.dumps({"stage": asker.stage, "answers": records,
                      "correct": sum(r["correct"] for r in records), "asked": len(records)}))
  else:
    print(format_records(records, asker.stage))
  sys.stdout.flush()


def run() -> None:
  """`python -m kstore_jax.ask` (the shim kstore_jax/ask.py calls this)."""
  cli.run(main, "kstore_jax.ask", config_required=False)
