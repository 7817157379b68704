"""Byte-level BPE trained offline and deterministically on text generated from the pools (or
on an imported world's records, data.source).

Special tokens: `<|endoftext|>` (document separator, BOS and EOS), `<|pad|>`, `<|mask|>`.
"""

import functools
import hashlib
import json
import os
import tempfile

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kstore_jax.data import pools as pools_lib
from kstore_jax.data import records
from kstore_jax.data import templates as templates_lib
from kstore_jax.data.population import MONTHS, FIRST_YEAR, N_DAYS, N_YEARS
from kstore_jax.errors import ConfigError, no_file

SPECIAL_TOKENS = records.SPECIAL_TOKENS   # (owned there: records refuse text holding one)
EOT, PAD, MASK = SPECIAL_TOKENS


def training_corpus() -> list[str]:
  """Deterministic text covering every pool value, template and question, in context."""
  p = pools_lib.load_pools()
  values = {
      "birth_date": [f"{MONTHS[i % 12]} {i % N_DAYS + 1}, {FIRST_YEAR + i % N_YEARS}"
                     for i in range(N_YEARS * 3)],
      "birth_city": list(p.birth_cities), "university": list(p.universities),
      "major": list(p.majors), "company": list(p.companies), "company_city": list(p.hq_cities),
  }
  nf, nm, nl = len(p.first_names), len(p.middle_names), len(p.last_names)
  names = [f"{p.first_names[i % nf]} {p.middle_names[(7 * i + r) % nm]} "
           f"{p.last_names[(13 * i + 3 * r) % nl]}" for r in range(8) for i in range(nl)]
  lines = []
  for a, temps in templates_lib.load_templates().items():
    vals = values[a]
    for i in range(max(len(vals), 4 * len(temps))):
      mid, tail = temps[i % len(temps)]
      subj = names[i % len(names)] if i % 3 == 0 else ("He", "She")[i % 2]
      lines.append(f"{subj}{mid} {vals[i % len(vals)]}{tail}")
    q0, q1 = templates_lib.QUESTIONS[a]
    lines += [f"{q0} {names[i]}{q1} {vals[i % len(vals)]}" for i in range(0, len(names), 7)]
  return lines


# How train_tokenizer trains (part of the cache key of a generated world's BPE, with the
# corpus, the vocabulary size and the tokenizers version)
BPE_SETTINGS = dict(add_prefix_space=False, min_frequency=1, special_tokens=SPECIAL_TOKENS)
# names the generated tokenizers' cache directory for every process that sees it, whatever
# train.tokenizer_cache says (as JAX_COMPILATION_CACHE_DIR does train.compile_cache)
CACHE_ENV = "KSTORE_TOKENIZER_CACHE"


def train_tokenizer(vocab_size: int, texts=None) -> tokenizers.Tokenizer:
  """A byte-level BPE of `vocab_size` trained on `texts` (an iterable; default:
  training_corpus(), the generated world's text)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=BPE_SETTINGS["add_prefix_space"])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(BPE_SETTINGS["special_tokens"]),
      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      min_frequency=BPE_SETTINGS["min_frequency"])
  tok.train_from_iterator(training_corpus() if texts is None else texts, trainer=trainer)
  return tok


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Load a `tokenizer.json`; it must know the special tokens (the EOT one at least).
  ConfigError naming the file when it is not one."""
  if not os.path.isfile(path):
    raise no_file("data.tokenizer_path", path)
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:   # tokenizers raises plain Exception for every unreadable file
    raise ConfigError(f"{path}: not a tokenizer.json ({' '.join(str(e).split())})") from None
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  if EOT in missing:
    raise ConfigError(f"{path}: the tokenizer has no {EOT} token (the document separator)")
  if missing:
    tok.add_special_tokens(missing)
  return tok


@functools.lru_cache(maxsize=4)
def _generated_tokenizer_json(vocab_size: int, cache: str = "") -> str:
  """The generated world's BPE (its text depends on nothing but the templates and pools), as
  JSON: trained once per process and vocabulary size (the runs of a grid share it), a fresh
  Tokenizer made from it for each caller; kept in the directory `cache` ('' = none) under a
  hash of everything it is trained from (`cached_bpe_path`), so other processes load it
  instead of training it again (0.4-0.6 CPU-s)."""
  corpus = training_corpus()   # (once: the cache key and the training both read it)
  if not cache:
    return train_tokenizer(vocab_size, corpus).to_str()
  path = cached_bpe_path(cache, vocab_size, corpus)
  if os.path.isfile(path):
    with open(path) as f:
      text = f.read()
    try:
      tokenizers.Tokenizer.from_str(text)
      return text
    except Exception:   # pylint: disable=broad-except  (tokenizers raises plain Exception for
      pass            # JSON it cannot read: an entry cut short or damaged is trained again)
  text = train_tokenizer(vocab_size, corpus).to_str()
  _write_whole(path, text)
  return text


def _write_whole(path: str, text: str) -> None:
  """`text` into `path` whole or not at all (written aside, then renamed over it); a cache
  directory that cannot be written leaves the tokenizer uncached, the run unaffected."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def cached_bpe_path(cache: str, vocab_size: int, corpus=None) -> str:
  """The file of the generated world's BPE of `vocab_size` in the cache directory: named by a
  hash of its training `corpus` (default: training_corpus()), vocabulary size, BPE_SETTINGS
  and the tokenizers version."""
  corpus = training_corpus() if corpus is None else corpus
  key = json.dumps(dict(corpus=hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
                        vocab_size=vocab_size, settings=BPE_SETTINGS,
                        tokenizers=tokenizers.__version__), sort_keys=True)
  return os.path.join(os.path.expanduser(cache),
                      f"bpe-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json")


def get_tokenizer(data_cfg, cache: str = "") -> tokenizers.Tokenizer:
  """The tokenizer a data config asks for: loaded from `tokenizer_path`, or trained on the
  world's text (`data.source`: generated, or the imported records' bios, names and values);
  a generated world's from the directory `cache` when trained there before
  (train.tokenizer_cache; '' = always trained)."""
  if data_cfg.tokenizer_path:
    return load_tokenizer(data_cfg.tokenizer_path)
  if records.parse_source(data_cfg.source)[0] == records.GENERATED:
    return tokenizers.Tokenizer.from_str(_generated_tokenizer_json(data_cfg.vocab_size, cache))
  return train_tokenizer(data_cfg.vocab_size,
                         records.read_source(data_cfg.source).training_texts())



def of_config(cfg) -> tokenizers.Tokenizer:
  """The tokenizer of an experiment config: its data section's, the generated world's kept in
  train.tokenizer_cache (or the directory $KSTORE_TOKENIZER_CACHE names)."""
  return get_tokenizer(cfg.data, os.environ.get(CACHE_ENV) or cfg.train.tokenizer_cache)
