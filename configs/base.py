"""Defaults for every experiment. `get_config(arg)` with arg = "scale[,variant...]":

scale: 'paper' (GPT2-small on 100k people, the paper's training recipe; the tokenizer is the
project's own byte-level BPE of 8,192 trained on the bios' text, not GPT-2's 50,257, so names
and values take other token counts), 'small' (a ~20M CPU model), 'tiny' (the calibrated CPU
demo). variants: 'mixed' (QA of the train half mixed into pretraining, no finetune), 'lora'
(LoRA finetune: q/v rank 16, embedding rank 128, at 3x the full finetune's lr: a low-rank
update moves the model less a step), 'probe' (add the P- and Q-probing stages).

Row configs call `base.get_config(arg)` and change only the data spec, e.g.
`--config=configs/multi5_permute.py:tiny,mixed`. `arch(c, 'gbert'|'llama')` puts a row on
another architecture (configs/gbert/, configs/llama/).
"""

import ml_collections

# The stages in run order, each with its kind: `base` trains a language model from scratch
# (what probes and bio recall read), `train` trains one further (from a base stage's final/),
# `probe` trains a probe on a frozen base model, `eval` scores the last trained model. A new
# stage gets a line here (and a section in get_config).
STAGE_KINDS = {"pretrain": "base", "pretrain_mixed": "base", "finetune": "train",
               "pprobe": "probe", "qprobe": "probe", "eval": "eval"}
STAGE_NAMES = tuple(STAGE_KINDS)


def stages_of(*kinds: str) -> tuple[str, ...]:
  """The stages of these kinds, in run order."""
  return tuple(s for s, k in STAGE_KINDS.items() if k in kinds)


def stage_list(cfg) -> tuple[str, ...]:
  """`cfg.stages` as a tuple of names (split_stages)."""
  return split_stages(cfg.stages)


def split_stages(stages) -> tuple[str, ...]:
  """A stages value as a tuple of names. `--config.stages=pretrain,eval` arrives as the string
  or as the 1-tuple ('pretrain,eval',) (and config.json keeps it so): entries are split on
  commas."""
  s = (stages,) if isinstance(stages, str) else stages
  return tuple(x.strip() for entry in s for x in str(entry).split(",") if x.strip())


QA_METHODS = ("finetune", "mixed")   # the paper's two ways of QA training
NO_QA = "no QA training"             # a run with neither (e.g. pretrain,eval)


def qa_method(stages) -> str:
  """The QA training of a stage list (stage_list's): 'mixed' (pretrain_mixed), 'finetune',
  or NO_QA. The report's columns and grid.json's `method` both use it."""
  if "pretrain_mixed" in stages:
    return "mixed"
  return "finetune" if "finetune" in stages else NO_QA


BASE_STAGES = stages_of("base")
TRAIN_STAGES = stages_of("base", "train")            # the language model trains
PROBE_STAGES = stages_of("probe")
TRAINED_STAGES = stages_of("base", "train", "probe")  # a <stage>/ dir: checkpoints/, final/


def step_group(stage: str) -> str:
  """The stages whose runs may share one grid cohort's step: the base stages as one ("base":
  pretrain and pretrain_mixed train the same language-model loss from scratch on other data),
  every other stage alone."""
  return "base" if stage in BASE_STAGES else stage


def stage_seed(seed: int, stage: str) -> int:
  """The seed of a stage's data streams (document orders, chunk shuffles, masking, probe
  batches): distinct per stage, the same on every rerun."""
  return seed * 1000 + STAGE_NAMES.index(stage)


MODEL_SIZES = {
    "tiny": dict(num_layers=4, num_heads=4, d_model=128, d_ff=512),
    "small": dict(num_layers=6, num_heads=8, d_model=512, d_ff=2048),
    "gpt2_small": dict(num_layers=12, num_heads=12, d_model=768, d_ff=3072),
    "gpt2_medium": dict(num_layers=24, num_heads=16, d_model=1024, d_ff=4096),
}


def size_name(model_cfg) -> str:
  """The MODEL_SIZES name of a model section's shape (num_layers, num_heads, d_model, d_ff),
  or 'custom' when no size has it."""
  shape = {k: model_cfg[k] for k in MODEL_SIZES["tiny"]}
  return next((n for n, s in MODEL_SIZES.items() if s == shape), "custom")


def stage(steps, batch_size, lr, warmup_steps, weight_decay, **extra):
  return ml_collections.ConfigDict(dict(
      steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
      weight_decay=weight_decay, final_lr_fraction=0.1, b1=0.9, b2=0.98, eps=1e-6,
      grad_clip=1.0, **extra))


VARIANTS = ("mixed", "lora", "probe")

SCALES = {
    "paper": {},
    "small": dict(
        # 128-position rows (every bioS document fits: the longest, a fullname bio, has 111
        # positions at this size) attend over half the keys of 256-position ones.
        data=dict(n_people=2_000, seq_len=128), model=dict(size="small", rotary_fraction=0.5),
        **{s: dict(steps=6_000, batch_size=128, lr=1e-3, warmup_steps=300) for s in BASE_STAGES},
        finetune=dict(steps=1_500, batch_size=128, lr=3e-4),
        pprobe=dict(steps=1_000, batch_size=64), qprobe=dict(steps=1_000, batch_size=64),
        train=dict(log_every=50)),   # saves: at the stages' ends and every 10 minutes
    "tiny": dict(
        data=dict(n_people=500, seq_len=128), model=dict(size="tiny", rotary_fraction=0.5),
        # pretrain: 800 steps of 32 rows at peak lr 1.2e-2 (session 33; 64 rows at 5e-3 since
        # session 20, 1,000 x 64 at 3e-3 before): half the tokens, so the demo's pretraining
        # takes half the time, chosen on QA-valid people (a fifth of the QA-train half held
        # back), where it scored 79% against session 20's 61% (RESULTS.md, "How the setting
        # was found"). pretrain_mixed keeps session 20's setting: its QA rows share the batch,
        # and it was not re-tuned. 150 finetune steps left single's QA train at 80%: 250 stay
        pretrain=dict(steps=800, batch_size=32, lr=1.2e-2, warmup_steps=80),
        pretrain_mixed=dict(steps=800, batch_size=64, lr=5e-3, warmup_steps=80),
        finetune=dict(steps=250, batch_size=16, lr=1e-3),
        # 200 P-probe steps at the paper's lr 1e-3 leave the heads untrained (train loss 3.3,
        # every cell at baseline); at 1e-2 they fit and show the paper's picture. 250 probe
        # people give one or two examples per class of the 200-300-class attributes: the
        # embedding head reads them through the value tokens (RESULTS.md, "Probes")
        pprobe=dict(steps=200, batch_size=32, lr=1e-2, head="embedding"),
        qprobe=dict(steps=300, batch_size=64),
        train=dict(log_every=25, save_every=250),
        # 1,024 QA rows per batch (not 512): the tiny model's one-token decode steps are short
        # enough that per-op costs matter; fewer, larger batches make QA eval ~15% faster
        # (BENCHMARKS.md, "QA evaluation")
        eval=dict(batch_size=1024)),
}


def get_config(arg: str = "paper") -> ml_collections.ConfigDict:
  scale, *variants = [a.strip() for a in arg.split(",")]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"config variant {v!r}: expected some of {VARIANTS}")
  c = _scaled(scale)
  c.variants = ",".join(variants)
  if "mixed" in variants:
    c.stages = ("pretrain_mixed", "eval")
  if "lora" in variants:
    c.finetune.update(lora_rank=16, lora_embed_rank=128, lr=c.finetune.lr * 3)
  if "probe" in variants:
    c.stages = tuple(c.stages) + ("pprobe", "qprobe")
  return c


def _scaled(scale: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.scale = scale
  c.seed = 0
  c.stages = ("pretrain", "finetune", "eval")

  c.data = ml_collections.ConfigDict(dict(
      n_people=100_000, multi=1, permute=False, permute_copies=1, fullname=False,
      qa_ratio=0.8,            # pretrain_mixed: fraction of documents that are QA pairs
      qa_train_fraction=0.5,   # people whose QA is training data; the rest are the test
      # of those QA-train people (each group's), the share held back from training for tuning:
      # QA eval reports them as qa_valid; 0 = none (the test people are the same either way)
      qa_valid_fraction=0.0,
      seq_len=512, vocab_size=8192, tokenizer_path="",
      # where bios come from: 'generated' (the population and templates), or an imported
      # dataset of bio records (kstore_jax/data/records.py): 'jsonl:FILE' | 'tfds:DIR'; its
      # people replace n_people and its bios the augmentation keys (README, "Bring your own")
      source="generated",
      chunk_docs=1024, workers=0,
      # named groups of people, each a `group(...)` (kstore_jax/data/world.py); empty: one
      # group of everyone written as the keys above say
      groups=ml_collections.ConfigDict(),
      # model.causal=False (GBERT) trains whole-word masked LM (kstore_jax/data/masking.py):
      # word_rate of the words selected; of those, `mask` -> mask tokens, `random` -> random
      # tokens, the rest unchanged. QA answers are always masked in full.
      mlm=ml_collections.ConfigDict(dict(word_rate=0.15, mask=0.8, random=0.1))))

  c.model = ml_collections.ConfigDict(dict(
      size="gpt2_small", **MODEL_SIZES["gpt2_small"], rotary_fraction=0.25,  # sizes: MODEL_SIZES
      rotary_base=10000.0, block="gpt2", causal=True, tie_embeddings=True,
      # what the backward pass recomputes: none | full | dots | dots_no_batch
      # (kstore_jax/model/transformer.py REMAT_POLICIES); scan_layers: one scanned block
      remat="none", scan_layers=False,
      # 'auto': float32 compute on CPU, bfloat16 on GPU/TPU (params and optimizer state stay
      # float32; softmax, logits and the loss in float32)
      dtype="auto",
      # 'auto': cpu_docs on CPU (a C++ kernel built on first use; einsum where no compiler),
      # pallas_docs (flash over each document's tiles) on CUDA, splash on TPU; or one of
      # kstore_jax/model/attention.py's IMPLEMENTATIONS
      attention="auto",
      # pallas_docs' launch, comma-separated field=value pairs replacing the tuned default's
      # (kstore_jax/model/flash_docs.py LAUNCH): block (its tile), warps, stages, heads (a
      # program's), split (the backward as two kernels), unroll (a range's diagonal-end
      # tiles as straight-line code), e.g. "warps=8,stages=1"; "" the
      # default. The same function at any launch, so a run may change it when it resumes
      flash_launch="",
      # the residual adds and the norms after them: 'auto' (pallas on CUDA, xla elsewhere),
      # 'xla' (XLA's own fusions) or 'pallas' (one Triton kernel each:
      # kstore_jax/model/fused_norm.py; CUDA, or a CPU interpreting it)
      norm="auto"))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.pretrain = stage(80_000, 96, 1e-3, 1000, 0.1)
  c.pretrain_mixed = stage(80_000, 96, 1e-3, 1000, 0.1)
  c.finetune = stage(50_000, 48, 3e-4, 0, 0.01, lora_rank=0, lora_embed_rank=0,
                     lora_alpha=1.0)
  # head: 'linear' (the paper's classifier) | 'embedding' (class weights through the frozen
  # embedding of each value's tokens; kstore_jax/model/probes.py)
  c.pprobe = stage(30_000, 50, 1e-3, 0, 0.3, embed_rank=2, head="linear")
  c.qprobe = stage(30_000, 50, 1e-3, 0, 0.3, embed_rank=16, head="linear")

  c.train = ml_collections.ConfigDict(dict(
      log_every=100, keep_checkpoints=2, eval_every=0, eval_people=200,
      # a checkpoint every `save_every` steps, at a stage's end, and once `save_minutes` have
      # passed since the last one (0: off): a GPU's fast steps save every 10 minutes, not every
      # few hundred steps (the small grid on an H200: 12 pauses of ten runs' states in 7
      # minutes of steps, and its steps slowed by a fifth for ~50 steps after each, session
      # 37), and a CPU's slow ones lose at most 10 minutes to a crash
      save_every=20_000, save_minutes=10.0,
      # the LM stages (pretrain, pretrain_mixed, finetune) compute each step's gradient over
      # microbatches of this many rows, one after another, and update once: the same step up
      # to float summation order, with a fraction of the activations in memory (0 = the whole
      # batch; `small` on a 2-core CPU at 32: peak 4.5-6.2 GB instead of 7.5, the same step
      # time: BENCHMARKS.md)
      microbatch_rows=0,
      # the device memory a step may use, GB a device (0: the device's own: a GPU's or TPU's
      # allocator limit, a CPU device's share of the machine's RAM): a step that needs more is
      # refused in one line before it runs; a grid cuts its cohorts to what fits in 90% of it
      # (kstore_jax/train/memory.py)
      memory_gb=0.0,
      # jax's persistent compilation cache ('' = off): a rerun loads what it compiled before
      compile_cache="~/.cache/kstore_jax/jax",
      # the generated world's tokenizer, trained once per vocabulary size and kept under a hash
      # of what it is trained from ('' = trained in every process: 0.4-0.6 CPU-s)
      tokenizer_cache="~/.cache/kstore_jax/tokenizers",
      # "START,STOP": a jax.profiler trace of steps [START, STOP) into <stage>/profile/
      # (kstore_jax/train/profiling.py); '' = off
      profile_steps=""))
  c.eval = ml_collections.ConfigDict(dict(batch_size=512, max_people=0))

  if scale not in SCALES:
    raise ValueError(f"config scale {scale!r}: expected one of {tuple(SCALES)}")
  for section, values in SCALES[scale].items():
    c[section].update(values)
  c.model.update(MODEL_SIZES[c.model.size])
  return c


# Architectures beside the paper's GPT-2 (PAPER.md "Model and training"): GBERT = the same net
# without the causal mask, trained with whole-word masked LM (data.mlm); Llama = RMSNorm, SwiGLU,
# full rotary.
ARCHS = {"gpt2": {}, "gbert": dict(causal=False), "llama": dict(block="llama", rotary_fraction=1.0)}


def arch(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A row config `c` on architecture `name` (ARCHS); its name becomes `<name>_<row>`."""
  if name not in ARCHS:
    raise ValueError(f"architecture {name!r}: expected one of {tuple(ARCHS)}")
  c.model.update(ARCHS[name])
  c.name = f"{name}_{c.name}"
  return c


def row(arg: str, name: str, **data) -> ml_collections.ConfigDict:
  """A bioS data row: the base config at `arg` with `name` and the data spec `data`."""
  c = get_config(arg)
  c.name = name
  c.data.update(data)
  return c


def group(people: float, tokens: float, qa_train_fraction: float,
          **aug) -> ml_collections.ConfigDict:
  """One entry of `data.groups`. people: its share of data.n_people (groups take contiguous
  person ids in sorted name order); tokens: its share of the pretraining bio positions;
  qa_train_fraction: the share of its people whose QA is training data (the rest are its
  QA test); aug: multi / permute / permute_copies / fullname, as the data keys of a row."""
  return ml_collections.ConfigDict(dict(
      people=people, tokens=tokens, qa_train_fraction=qa_train_fraction,
      **{**dict(multi=1, permute=False, permute_copies=1, fullname=False), **aug}))


def grouped_row(arg: str, name: str, people_factor: float,
                **groups: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A population of named groups: the base config at `arg` with data.n_people scaled by
  `people_factor` and data.groups = `groups` (each a `group(...)`)."""
  c = row(arg, name)
  c.data.n_people = round(c.data.n_people * people_factor)
  c.data.groups = ml_collections.ConfigDict(groups)
  return c
