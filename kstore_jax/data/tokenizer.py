"""Byte-level BPE trained offline and deterministically on text generated from the pools (or
on an imported world's records, data.source).

Special tokens: `<|endoftext|>` (document separator, BOS and EOS), `<|pad|>`, `<|mask|>`.
"""

import functools
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kstore_jax.data import pools as pools_lib
from kstore_jax.data import records
from kstore_jax.data import templates as templates_lib
from kstore_jax.data.population import MONTHS, FIRST_YEAR, N_DAYS, N_YEARS
from kstore_jax.errors import ConfigError

EOT, PAD, MASK = "<|endoftext|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (EOT, PAD, MASK)


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


def train_tokenizer(vocab_size: int, texts=None) -> tokenizers.Tokenizer:
  """A byte-level BPE of `vocab_size` trained on `texts` (an iterable; default:
  training_corpus(), the generated world's text)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
  tok.train_from_iterator(training_corpus() if texts is None else texts, trainer=trainer)
  return tok


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Load a `tokenizer.json`; it must know the special tokens (the EOT one at least).
  ConfigError naming the file when it is not one."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.tokenizer_path: no such file {path!r}")
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
def _generated_tokenizer_json(vocab_size: int) -> str:
  """The generated world's BPE (its text depends on nothing but the templates and pools), as
  JSON: trained once per process and vocabulary size (the runs of a grid share it), a fresh
  Tokenizer made from it for each caller."""
  return train_tokenizer(vocab_size).to_str()


def get_tokenizer(data_cfg) -> tokenizers.Tokenizer:
  """The tokenizer a data config asks for: loaded from `tokenizer_path`, or trained on the
  world's text (`data.source`: generated, or the imported records' bios, names and values)."""
  if data_cfg.tokenizer_path:
    return load_tokenizer(data_cfg.tokenizer_path)
  if records.parse_source(data_cfg.source)[0] == records.GENERATED:
    return tokenizers.Tokenizer.from_str(_generated_tokenizer_json(data_cfg.vocab_size))
  return train_tokenizer(data_cfg.vocab_size,
                         records.read_source(data_cfg.source).training_texts())
