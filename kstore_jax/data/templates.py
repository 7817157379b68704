"""Sentence templates (ours, >= 50 per attribute) and the QA question wording.

A template is `"{subj} <words> {value}<tail>."`; `{subj}` becomes the full name or the pronoun.
"""

import functools
import pathlib

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "company", "company_city")
TEMPLATE_DIR = pathlib.Path(__file__).parent / "templates"

# (text before the name, text between the name and the answer). Whitespace is part of the
# contract: training and evaluation build prompts from these same pieces.
QUESTIONS = {
    "birth_date": ("What is the birth date of", "?\nAnswer:"),
    "birth_city": ("What is the birth city of", "?\nAnswer:"),
    "university": ("Which university did", " study?\nAnswer:"),
    "major": ("What major did", " study?\nAnswer:"),
    "company": ("Which company did", " work for?\nAnswer:"),
    "company_city": ("Where did", " work?\nAnswer:"),
}


def split_template(template: str) -> tuple[str, str]:
  """`"{subj} was born on {value}."` -> (" was born on", ".")."""
  if not template.startswith("{subj}") or template.count("{value}") != 1:
    raise ValueError(f"bad template: {template!r}")
  mid, tail = template[len("{subj}"):].split(" {value}")
  return mid, tail


@functools.cache
def load_templates() -> dict[str, tuple[tuple[str, str], ...]]:
  """attribute -> tuple of (mid, tail) pieces."""
  out = {}
  for a in ATTRIBUTES:
    lines = (TEMPLATE_DIR / f"{a}.txt").read_text(encoding="utf-8").splitlines()
    out[a] = tuple(split_template(t) for t in lines)
  return out
