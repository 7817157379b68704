"""Running an experiment's stages in a workdir (what `python -m kstore_jax.main` does).

WORKDIR/config.json, tokenizer.json, world.json, results.json; WORKDIR/<stage>/{metrics.jsonl,
checkpoints/, final/, events.*}. A stage with final/ is done and skipped; an interrupted one
resumes from its newest readable checkpoint. Later stages read the previous stage's final/.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from configs.base import BASE_STAGES, PROBE_STAGES, TRAIN_STAGES, stage_seed, step_group
from kstore_jax import configlib, rundir
from kstore_jax.data import classes, pipeline, probing, world as world_lib
from kstore_jax.data.render import N_ATTR
from kstore_jax.data.templates import ATTRIBUTES
from kstore_jax.eval import qa_eval
from kstore_jax.model import attention as attention_lib, lora as lora_lib, probes
from kstore_jax.model.transformer import ModelConfig, Transformer, flops_per_token, model_vocab
from kstore_jax.train import checkpoint, loop, sharding, step as step_lib


class Workdir:
  """The exclusive lock and the run files of a workdir (their layout: kstore_jax/rundir.py)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._lock = None

  def lock(self) -> None:
    """Lock the workdir against a second run (one lock file per process: rundir.lock); a
    second call keeps the lock it holds."""
    if self._lock is None:
      self._lock = rundir.lock(self.path, jax.process_index())

  def unlock(self) -> None:
    """Let the lock go (a grid's processes-mode parent, whose children lock their runs)."""
    if self._lock is not None:
      self._lock.close()
      self._lock = None

  def file(self, *parts) -> str:
    return os.path.join(self.path, *parts)

  def stage(self, stage: str) -> str:
    """The stage's directory."""
    return rundir.stage_dir(self.path, stage)

  def check_same_experiment(self, cfg, platform: str) -> None:
    """Refuse to resume a workdir that holds a different experiment. A key missing from the
    saved config (written before the key existed) counts as its configs/base.py default;
    `model.dtype` is compared as resolved for `platform` (a run saved with float32 resumes on
    a CPU with `auto`)."""
    path = self.file(rundir.CONFIG)
    if not os.path.exists(path):
      return
    old = {**_flatten(_json(base.get_config(_base_arg(cfg)))), **_flatten(rundir.read_json(path))}
    new = _flatten(_json(cfg))
    for d in (old, new):
      d["model.dtype"] = attention_lib.resolve_dtype(d["model.dtype"], platform)
    # The mesh is a property of the run, not of the experiment: a checkpoint restores onto any
    # mesh (elastic resume); so are the attention and norm kernels, the flash kernel's launch,
    # remat and layer scan (the same function). data.workers changes Grain's state format, so
    # it is compared.
    ignore = ("stages", "variants", "train.", "eval.", "mesh.", "model.attention",
              "model.flash_launch", "model.norm", "model.remat", "model.scan_layers")
    for k in sorted(set(old) | set(new)):
      if not k.startswith(ignore) and old.get(k) != new.get(k):
        raise configlib.ConfigError(
            f"--workdir={self.path} holds a different experiment: config key {k!r} is "
            f"{old.get(k)!r} there, {new.get(k)!r} now")

  def check_results(self) -> None:
    """ConfigError naming results.json where it holds no JSON object (rundir.read_json):
    Experiment.start merges it, after writing config.json and the rest."""
    path = self.file(rundir.RESULTS)
    if os.path.exists(path):
      rundir.read_json(path)

  def check_same_world(self, cfg, world) -> None:
    """Refuse to resume a workdir whose run trained on other data than `world` holds (an
    imported data.source file edited or replaced since, or a population drawn differently):
    the config alone cannot tell. A workdir written before world.json existed is not checked."""
    path = self.file(rundir.WORLD)
    if not os.path.exists(path):
      return
    old = rundir.read_json(path).get("digest")
    if old != world.digest:
      raise configlib.ConfigError(
          f"--workdir={self.path} holds a different experiment: its data "
          f"(data.source={cfg.data.source!r}) has changed since the run started (world "
          f"digest {str(old)[:12]} there, {world.digest[:12]} now)")

  def check_same_tokenizer(self, cfg, tok) -> None:
    """Refuse to resume a workdir whose run tokenised its text otherwise than `tok` does (a
    data.tokenizer_path file replaced, a BPE retrained by another tokenizers version): the
    world's digest holds no token ids, and the model's vocabulary size may well be the same."""
    import tokenizers
    path = self.file(rundir.TOKENIZER)
    if not os.path.exists(path):
      return
    if tokenizers.Tokenizer.from_file(path).to_str() != tok.to_str():
      given = (f"data.tokenizer_path={cfg.data.tokenizer_path!r}" if cfg.data.tokenizer_path
               else "the BPE trained now")
      raise configlib.ConfigError(
          f"--workdir={self.path} holds a different experiment: its {rundir.TOKENIZER} is not "
          f"the tokenizer {given} gives")

  def write_json(self, name: str, obj) -> None:
    if jax.process_index() != 0:
      return
    rundir.write_json(self.file(name), obj)


def _json(cfg) -> dict:
  return json.loads(cfg.to_json())


def _base_arg(cfg) -> str:
  """base.get_config's argument for cfg's scale and variants ("tiny", "small,mixed")."""
  return ",".join(filter(None, (cfg.scale, cfg.variants)))


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class Experiment:
  """Config + world + model + mesh; runs stages."""

  def __init__(self, cfg, tokenizer, workdir: Workdir, platform: str | None = None,
               mesh=None):
    self.cfg, self.workdir = cfg, workdir
    self._specs = {}   # first_spec's
    self.world = world_lib.build_world(cfg, tokenizer)
    # next-token rows: a document of T tokens takes T-1 positions; masked-LM rows (GBERT): T
    longest = self.world.max_doc_positions() + (0 if cfg.model.causal else 1)
    if longest > cfg.data.seq_len:
      raise configlib.ConfigError(
          f"data.seq_len={cfg.data.seq_len} is shorter than the longest document "
          f"({longest} positions)")
    # (`mesh`: another, e.g. of compile-only devices: bench roofline)
    self.mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    # `auto` dtype and attention are decided for the platform the mesh's devices are on, or
    # for `platform` when the caller lowers for another one (bench lower)
    self.platform = platform or attention_lib.platform_of(self.mesh.devices.flat)
    # a row holds at most this many documents (cudnn's packed layout is sized by it; 0 for
    # the other kernels, so worlds with other document lengths share one model and its
    # compiled functions: a grid's runs)
    self.model_cfg = ModelConfig.from_config(cfg.model, model_vocab(self.world.renderer),
                                             self.platform)
    if self.model_cfg.attention == "cudnn":
      self.model_cfg = dataclasses.replace(
          self.model_cfg, max_docs=-(-cfg.data.seq_len // max(self.world.doc_positions[0], 1)))
    self.model = Transformer(self.model_cfg)

  @functools.cached_property
  def model_abstract(self):
    """(abstract params with shardings, boxed init fn, boxed abstract params)."""
    return _model_abstract(self.model, self.cfg.data.seq_len, self.mesh)

  def random_params(self, seed: int):
    """A fresh model's params: pretrain's initial params for `seed` (the same init and key),
    sharded as `load_final` places a finished stage's (benchmarks run on them)."""
    abstract, init, _ = self.model_abstract
    with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(self.mesh):
      fresh = jax.jit(lambda rng: nn.meta.unbox(init(rng)),
                      out_shardings=jax.tree.map(lambda x: x.sharding, abstract))
      return fresh(jax.random.PRNGKey(seed))

  def rebox(self, params):
    """Loaded (plain) params boxed with the model's logical axes, so a stage that starts from
    them shards them (and their optimizer state) like a fresh model."""
    boxed = self.model_abstract[2]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree.map(lambda b, x: b.replace_boxed(x) if is_box(b) else x, boxed, params,
                        is_leaf=is_box)

  def stages(self) -> tuple[str, ...]:
    return configlib.stage_list(self.cfg)

  def final_dir(self, stage: str) -> str:
    return rundir.final_dir(self.workdir.stage(stage))

  def source_stage(self, stage: str, candidates) -> str:
    """The stage whose final params `stage` starts from: the last earlier configured one among
    candidates, else any finished one in the workdir."""
    order = self.stages()
    before = order[:order.index(stage)] if stage in order else order
    for s in reversed(before):
      if s in candidates:
        return s
    for s in candidates[::-1]:
      if os.path.isdir(self.final_dir(s)):
        return s
    raise configlib.ConfigError(
        f"stages: {stage!r} needs one of {candidates} to run first (none is configured or done)")

  def check_sources(self) -> None:
    """ConfigError (before the workdir is taken) if a configured stage needs another's params
    (finetune and the probes a base stage's, eval a trained one's) that is neither configured
    before it nor done in the workdir: the check source_stage makes when the stage runs."""
    for stage in self.stages():
      if stage == "finetune" or stage in PROBE_STAGES:
        self.source_stage(stage, BASE_STAGES)
      elif stage == "eval":
        self.source_stage(stage, TRAIN_STAGES)

  def load_final(self, stage: str):
    return checkpoint.load_params(self.final_dir(stage), self.model_abstract[0])

  def start(self, tokenizer) -> None:
    """Take the workdir: lock it, write config.json and tokenizer.json, and drop an earlier
    run's results of stages not configured now. Call once everything is validated."""
    self.workdir.lock()
    self.workdir.write_json(rundir.CONFIG, self.cfg.to_dict())
    self.workdir.write_json(rundir.WORLD, {"digest": self.world.digest})
    if jax.process_index() == 0:
      rundir.write_atomic(self.workdir.file(rundir.TOKENIZER), tokenizer.to_str(pretty=True))
    self.write_results(None, {})

  def run(self) -> None:
    for stage in self.stages():
      self.run_stage(stage)

  def run_stage(self, stage: str) -> None:
    """Train (unless done), probe or evaluate `stage` alone."""
    if stage in TRAIN_STAGES:
      if self.done(stage):
        print(f"[{stage}] already done, skipping", flush=True)
      else:
        loop.run_stage(self.first_spec(stage), self.cfg, self.workdir.stage(stage), self.mesh)
    elif stage in PROBE_STAGES:
      self.probe(stage)
    else:
      self.evaluate()

  def first_spec(self, stage: str) -> loop.StageSpec:
    """train_spec(stage), made once: check_first_fits compiles the step of the spec the stage
    then trains with (one loss function, one jitted step: the compile is jax's to reuse)."""
    if stage not in self._specs:
      self._specs[stage] = self.train_spec(stage)
    return self._specs[stage]

  def check_first_fits(self) -> None:
    """ConfigError (before the workdir is taken) if the step of the first stage to train, a
    base stage that starts from nothing, needs more memory a device than it holds
    (loop.check_fits: a data.seq_len or batch size too large for the machine was refused
    after the workdir was written, or the process was killed building it). Its compile is
    the one the stage's first step runs."""
    todo = [s for s in self.stages() if s in TRAIN_STAGES and not self.done(s)]
    if not todo or todo[0] not in BASE_STAGES:
      return
    spec = self.first_spec(todo[0])
    try:
      compiled = loop.traced_step(spec, self.mesh, self.cfg.seed).lower().compile()
    except jax.errors.JaxRuntimeError as e:   # XLA refuses a program of that size (a
      # batch of 10^8 rows: more scatter indices than int32 counts)
      raise configlib.ConfigError(
          f"[{todo[0]}] the {todo[0]} step of {spec.stage_cfg.batch_size} rows x data.seq_len="
          f"{self.cfg.data.seq_len} cannot be compiled: {str(e).splitlines()[0][:200]}") from None
    loop.check_fits(compiled, self.cfg.train, self.mesh, todo[0], spec, 0)

  def done(self, stage: str) -> bool:
    """A training or probing stage is done when its final/ params exist."""
    return rundir.is_done(self.workdir.stage(stage))

  def member(self, stage: str, label: str, abstract: bool = False
             ) -> tuple[loop.Member, tuple]:
    """The training (or probe-training) `stage` as a cohort member, and its cohort key: runs
    whose keys are equal can train in one vmapped step (the same model, stage settings,
    batch shape and loss function; they differ in data, initial params and frozen trees).
    Stages of one `step_group` (configs/base.py) share a key space: a finetune run's
    pretrain and a mixed run's pretrain_mixed with equal settings are one cohort (small5: 10
    runs a step instead of two cohorts of 5 one after the other).
    `abstract`: the base model (finetune, probes) as shapes, not loaded: the key alone is
    good (a grid keys every run first and loads each cohort's bases when it trains)."""
    cfg = self.cfg
    base = self.model_abstract[0] if abstract else None
    if stage in PROBE_STAGES:
      if base is None:
        base = self.load_final(self.source_stage(stage, BASE_STAGES))
      spec = self.probe_spec(stage, base)
      tokens = self.class_tokens(stage)
      loss_consts = None if tokens is None else tuple(
          (ids.tobytes(), ids.shape) for ids, _ in tokens)
    else:
      spec, loss_consts = self.train_spec(stage, base), None
    train = {k: v for k, v in cfg.train.to_dict().items() if k != "eval_people"}
    # members are initialised by the first one's init: a probe head's class counts (two
    # imported worlds can differ in them alone) belong in the key
    heads = tuple(classes.n_classes(self.world.pop)) if stage in PROBE_STAGES else None
    key = (step_group(stage), self.model_cfg, cfg[stage].to_json(),
           spec.positions_per_step, json.dumps(train, sort_keys=True), loss_consts, heads,
           jax.tree.structure(spec.frozen), str(jax.tree.map(jnp.shape, spec.frozen)))
    return loop.Member(spec, self.workdir.stage(stage), cfg.seed, label), key

  # -- training stages -------------------------------------------------------------------
  def train_spec(self, stage: str, base=None) -> loop.StageSpec:
    """`stage`'s spec; a finetune's `base` (default: its source stage's final params)."""
    cfg, sc = self.cfg, self.cfg[stage]
    lm_flops = flops_per_token(self.model_cfg, cfg.data.seq_len)
    _, init_model, _ = self.model_abstract
    chunks = self.world.chunks(stage, cfg.data, mlm=not cfg.model.causal)
    data = functools.partial(pipeline.make_pipeline, chunks, sc.batch_size, cfg.data.workers)
    eval_fn = functools.partial(self.sample_eval, n=cfg.train.eval_people)
    rows = cfg.train.microbatch_rows
    lm = dict(data=data, positions_per_step=sc.batch_size * cfg.data.seq_len,
              flops_per_position=lm_flops, eval_fn=eval_fn, dtype=self.model_cfg.dtype,
              microbatches=sc.batch_size // rows if rows else 1,
              platform=self.model_cfg.platform,
              less_memory=f"set train.microbatch_rows (the same step in parts), or lower "
                          f"{stage}.batch_size or data.seq_len (a new workdir)")
    if stage != "finetune":
      return loop.StageSpec(stage, sc, step_lib.make_lm_loss(self.model),
                            lambda rng, _: init_model(rng), {}, export=lambda p, f: p, **lm)
    if base is None:
      base = self.load_final(self.source_stage(stage, BASE_STAGES))
    if not sc.lora_rank:
      return loop.StageSpec(stage, sc, step_lib.make_lm_loss(self.model),
                            lambda rng, params: self.rebox(params), {}, export=lambda p, f: p,
                            init_args=base, **lm)
    merge = functools.partial(lora_lib.merge, alpha=sc.lora_alpha)
    init_lora = functools.partial(lora_lib.init, rank=sc.lora_rank, embed_rank=sc.lora_embed_rank)
    # the base is frozen: its weights get no gradient but where LoRA merges into them
    lm["flops_per_position"] = (flops_per_token(self.model_cfg, cfg.data.seq_len, "inputs")
                                + lora_lib.flops_per_position(
                                    self.model_cfg, sc.lora_rank, sc.lora_embed_rank,
                                    lm["positions_per_step"]))
    return loop.StageSpec(stage, sc, step_lib.make_lm_loss(self.model, merge), init_lora, base,
                          export=lambda p, f: merge(f, p), init_args=base, **lm)

  # -- probing stages --------------------------------------------------------------------
  def probe_spec(self, stage: str, base) -> loop.StageSpec:
    cfg, sc, w = self.cfg, self.cfg[stage], self.world
    # any batch size on any mesh: rows padded up to what the batch axes and processes divide
    # (the paper's 50 on 8 devices: 56 rows, 6 of them weighing nothing)
    rows = probing.padded_rows(sc.batch_size, math.lcm(sharding.batch_shards(self.mesh),
                                                       jax.process_count()))
    batches = probing.ProbeBatches(w, w.train_people, stage, sc.batch_size,
                                   probing.probe_width(w, stage),
                                   seed=stage_seed(cfg.seed, stage), rows=rows)
    probed = N_ATTR if stage == "pprobe" else 1   # positions an example probes
    init = functools.partial(   # the settings bound now: a config changed later does not count
        probes.init, vocab=base["embed"]["embedding"].shape[0], d_model=self.model_cfg.d_model,
        embed_rank=sc.embed_rank, n_positions=probed,
        classes=classes.n_classes(self.world.pop), head=sc.head)
    return loop.StageSpec(
        stage, sc, probes.make_probe_loss(self.model, self.class_tokens(stage)),
        lambda rng, _: init(rng), base,
        data=functools.partial(pipeline.batch_pipeline, batches, rows, cfg.data.workers),
        positions_per_step=sc.batch_size * batches.width,
        # the frozen model up to its hidden states; gradients pass back through it only to
        # the probe's embedding update. A bidirectional model runs once per probed position
        # (probes.probed_hidden: the input cut after it; counted 1x, a GBERT P-probe's step
        # was 5x over its count; XLA computes what the passes share once: ~15% under 6x)
        flops_per_position=flops_per_token(self.model_cfg, batches.width,
                                           "inputs" if sc.embed_rank else "none", head=False)
        * (1 if self.model_cfg.causal else probed),
        export=lambda p, f: p, dtype=self.model_cfg.dtype, platform=self.model_cfg.platform)

  def class_tokens(self, stage: str):
    """The embedding probe head's class value tokens (None for the linear head)."""
    if self.cfg[stage].head == "embedding":
      return classes.class_tokens(self.world.renderer, self.world.pop)
    return None

  def probe_accuracy(self, stage: str):
    """jitted (base, probe, batch) -> [J, 6] accuracy of the stage's probe on a batch."""
    return jax.jit(functools.partial(probes.accuracy_matrix, self.model,
                                     tokens=self.class_tokens(stage)))

  def probe(self, stage: str) -> None:
    """Train (or resume) a probe on the QA-train half's people, score it on the test half."""
    base = self.load_final(self.source_stage(stage, BASE_STAGES))
    spec = self.probe_spec(stage, base)
    if self.done(stage):
      print(f"[{stage}] already done, skipping training", flush=True)
      abstract = jax.eval_shape(spec.init_params, jax.random.PRNGKey(0), spec.init_args)
      rep = sharding.replicated(self.mesh)
      params = checkpoint.load_params(self.final_dir(stage),
                                      checkpoint.abstract_with_shardings(
                                          abstract, jax.tree.map(lambda _: rep, abstract)))
    else:
      params = loop.run_stage(spec, self.cfg, self.workdir.stage(stage), self.mesh)
    w = self.world
    test = probing.ProbeBatches(w, self.eval_people()[0], stage,
                                self.cfg.eval.batch_size, probing.probe_width(w, stage), 0)
    acc = self.probe_accuracy(stage)
    total, n = 0.0, 0
    for s in range(0, len(test.people), test.batch_size):
      idx = np.arange(s, min(s + test.batch_size, len(test.people)))
      copy0 = idx * (w.aug.copies if stage == "pprobe" else 1)
      batch = test.examples(copy0)
      total = total + np.asarray(acc(base, params, batch)) * len(idx)
      n += len(idx)
    matrix = total / n
    results = {}
    ci = functools.partial(qa_eval.accuracy_interval, n=n)   # each cell: over n people
    if stage == "pprobe":
      results["pprobe"] = matrix.tolist()
      results["pprobe" + qa_eval.CI] = [[ci(v) for v in row] for row in matrix]
    else:
      results["qprobe"] = {**{a: float(matrix[0, i]) for i, a in enumerate(ATTRIBUTES)},
                           "mean": float(matrix[0].mean())}
      results["qprobe" + qa_eval.CI] = {
          **{a: ci(matrix[0, i]) for i, a in enumerate(ATTRIBUTES)},
          "mean": qa_eval.people_interval(matrix[0].mean(), n)}
    labels = classes.probe_labels(w.pop, test.people)
    results["probe_baseline"] = {a: float(np.bincount(labels[:, i]).max() / len(labels))
                                 for i, a in enumerate(ATTRIBUTES)}
    self.write_results(stage, results)
    print(f"[{stage}] accuracy by position x attribute:\n{np.round(matrix, 3)}", flush=True)

  def sample_eval(self, params, n: int) -> dict[str, float]:
    """QA accuracy on n people of each half, spread over the groups (periodic eval during
    training)."""
    w = self.world
    halves = (("train", spread(w.train_people, n)), ("test", spread(w.test_people, n)))
    parts = qa_eval.qa_correct_parts(self.model, params, w, [p for _, p in halves],
                                     self.cfg.eval.batch_size)
    return {f"qa_{half}": qa_eval.per_attribute(correct, attrs)["mean"]
            for (half, _), (correct, attrs, _) in zip(halves, parts)}

  # -- evaluation ------------------------------------------------------------------------
  def eval_people(self) -> tuple[np.ndarray, np.ndarray]:
    """The held-out and QA-train people the eval stage answers (eval.max_people of each,
    spread over the groups)."""
    cap = self.cfg.eval.max_people
    return spread(self.world.test_people, cap), spread(self.world.train_people, cap)

  def valid_people(self) -> np.ndarray:
    """The QA-valid people the eval stage answers (eval.max_people of them; empty unless
    data.qa_valid_fraction)."""
    return spread(self.world.valid_people, self.cfg.eval.max_people)

  def eval_parts(self) -> dict[str, np.ndarray]:
    """The people whose QA the eval stage answers: {"qa_test", "qa_train"[, "qa_valid"]}."""
    parts = dict(zip(("qa_test", "qa_train"), self.eval_people()))
    if len(self.valid_people()):
      parts["qa_valid"] = self.valid_people()
    return parts

  def eval_key(self) -> tuple:
    """Runs with equal keys ask the same questions, split into the same parts, of the same
    model shape: their eval can decode in one vmapped pass (evaluate_runs)."""
    parts = self.eval_parts()
    qs = qa_eval.qa_set(self.world, np.concatenate(list(parts.values())))
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(x).tobytes() for x in qs)).hexdigest()
    sizes = tuple((name, len(people)) for name, people in parts.items())
    return self.model_cfg, self.cfg.eval.batch_size, sizes, digest

  def evaluate(self, params=None, answered=None) -> dict:
    """QA test / train (/ valid) and bio recall of the last trained stage into results.json,
    each accuracy with its 95% Wilson interval (qa_eval.CI siblings). `params` (that stage's)
    and `answered` (qa_correct_parts of eval_parts, in its order) when the caller has them
    (evaluate_runs), else loaded and decoded here."""
    cfg, w = self.cfg, self.world
    src = self.source_stage("eval", TRAIN_STAGES)
    if params is None:
      params = self.load_final(src)
    results = {}
    parts = self.eval_parts()
    if answered is None:
      answered = qa_eval.qa_correct_parts(self.model, params, w, list(parts.values()),
                                          cfg.eval.batch_size)
    answered = dict(zip(parts, answered))
    for key, (correct, attrs, _) in answered.items():
      results.update(qa_eval.scored(key, correct, attrs))
    correct, attrs, alens = answered["qa_test"]
    results["qa_test_by_tokens"] = qa_eval.by_answer_tokens(correct, attrs, alens)
    results["qa_test_by_tokens" + qa_eval.CI] = qa_eval.by_answer_tokens_ci(correct, attrs,
                                                                            alens)
    if cfg.data.get("groups"):
      results["groups"] = group_results(w.groups, {
          k: v for key, (c, a, _) in answered.items()
          for k, v in qa_eval.by_group_scored(w.groups, key, parts[key], c, a).items()})
    store = self.source_stage("eval", BASE_STAGES)
    store_params = params if store == src else self.load_final(store)
    results.update(qa_eval.scored("bio_recall", *qa_eval.bio_recall_correct(
        self.model, store_params, w, parts["qa_test"], cfg.eval.batch_size)))
    results["evaluated_stage"] = src
    self.write_results("eval", results)
    valid = (f" valid {results['qa_valid']['mean']:.3f}" if "qa_valid" in results else "")
    print(f"[eval] {src}: QA test {results['qa_test']['mean']:.3f} "
          f"train {results['qa_train']['mean']:.3f}{valid} | bio recall "
          f"{results['bio_recall']['mean']:.3f}", flush=True)
    for name, r in results.get("groups", {}).items():
      print(f"[eval] group {name}: QA test {r['qa_test']['mean']:.3f}" if "qa_test" in r else
            f"[eval] group {name}: no held-out people", flush=True)
    return results

  def write_results(self, stage: str | None, entries: dict) -> None:
    """Record `entries` as `stage`'s in results.json (process 0 writes it; the others return).

    The file holds the entries of the stages in this config's stage list only: an earlier
    run's entries of any other stage (or of no recorded stage: a file written before
    rundir.PRODUCED_BY existed) are dropped, and so are `stage`'s own earlier entries. It
    maps each key to the stage that wrote it (`python -m kstore_jax.inspect` shows it). A
    file left empty is removed; `stage` None only drops entries."""
    if jax.process_index() != 0:
      return
    path = self.workdir.file(rundir.RESULTS)
    old = rundir.read_json(path) if os.path.exists(path) else {}
    by = old.pop(rundir.PRODUCED_BY, {})
    keep = set(self.stages()) - {stage}
    results = {k: v for k, v in old.items() if by.get(k) in keep}
    by = {k: by[k] for k in results}
    results.update(entries)
    by.update({k: stage for k in entries})
    if results:
      self.workdir.write_json(rundir.RESULTS, {**results, rundir.PRODUCED_BY: by})
    elif os.path.exists(path):
      os.remove(path)


@functools.lru_cache(maxsize=8)
def _model_abstract(model, seq_len: int, mesh):
  """Experiment.model_abstract of a model, row length and mesh: traced once in a process for
  all the Experiments that share them (a grid's runs, each keyed on it before its cohort
  trains: one trace of the model's init each, ~0.4 s at the paper size)."""
  dummy = np.zeros((1, seq_len), np.int32)   # a row length every kernel takes
  init = lambda rng: model.init(rng, dummy)["params"]
  key = jax.eval_shape(jax.random.PRNGKey, 0)   # abstract: no op runs (an AOT mesh has no
  with nn.logical_axis_rules(sharding.RULES), jax.set_mesh(mesh):   # device to run it on)
    boxed = jax.eval_shape(init, key)
    shardings = sharding.logical_shardings(boxed, mesh)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  return abstract, init, boxed


def evaluate_runs(exps: list[Experiment]) -> None:
  """The eval stage of several runs with one eval_key (a grid's cohort): their QA decoded in
  one pass vmapped over their params (stacked on a run axis), each run then scored and written
  as its own evaluate() does, with the same answers."""
  first = exps[0]
  params = [e.load_final(e.source_stage("eval", TRAIN_STAGES)) for e in exps]
  answered = qa_eval.qa_correct_parts(first.model, loop.stack_runs(params), first.world,
                                      list(first.eval_parts().values()),
                                      first.cfg.eval.batch_size, runs=True)
  for r, (e, p) in enumerate(zip(exps, params)):
    e.evaluate(p, [(correct[r], attrs, alens) for correct, attrs, alens in answered])


def group_results(groups, parts: dict[str, dict[str, dict]]) -> dict[str, dict]:
  """results.json `groups`: {name: {'people': n, part: scores}} from {part: {name: scores}}
  (a group without people in a part has no entry for it)."""
  return {g.name: {"people": g.stop - g.start,
                   **{part: by[g.name] for part, by in parts.items() if g.name in by}}
          for g in groups}


def spread(people: np.ndarray, n: int) -> np.ndarray:
  """n of the sorted ids `people` (all when n is 0 or at least their number), evenly spaced:
  each group (a contiguous id range) keeps its share, where the first n would hold the first
  groups' people only."""
  if not 0 < n < len(people):
    return people
  return people[np.arange(n) * len(people) // n]


def open_experiment(cfg, workdir: str, n_devices: int, platform: str):
  """(Experiment, tokenizer) of `cfg` in `workdir`, everything checked and nothing written:
  the config (ConfigError naming the first bad key), the tokenizer, a workdir holding another
  experiment, stages whose source stage is neither configured nor done, sequence length
  against the documents. `Experiment.start` then takes the
  workdir."""
  from kstore_jax.data import tokenizer as tokenizer_lib
  rundir.check_workdir(workdir)
  configlib.validate(cfg, n_devices, platform=platform)
  tok = tokenizer_lib.of_config(cfg)
  wd = Workdir(workdir)
  wd.check_same_experiment(cfg, platform)
  wd.check_results()
  exp = Experiment(cfg, tok, wd)
  exp.check_sources()
  wd.check_same_world(cfg, exp.world)
  wd.check_same_tokenizer(cfg, tok)
  return exp, tok
