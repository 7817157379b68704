"""Celebrities help minorities (PAPER.md, "Celebrity / minority"): pretrain -> QA finetune on
half of the celebrities -> QA eval on every minority person (none is ever in QA training) and
on the held-out celebrity half. Scales and variants as any row: `:tiny`, `:small`, `:tiny,mixed`.

minority: as many people as the scale's data.n_people (the size of the single_permute1 row,
whose paper result, 4.4%, is the control's), single+permute1 bios. star (the paper's
celebrities): a fifth as many again, i.e. 1/6 of everyone (PAPER.md: "e.g. 1/6"),
multi5+permute bios. Each group gets half of the pretraining bio positions: there are as many
star bios (5 per star) as minority bios, so every bio is read equally often, as in one
shuffled corpus of all bios.

The celebrities are named `star` so that they sort after `minority`: groups take person ids in
sorted name order, and the minority keeps ids [0, n_people) with the same people and bios
here and in configs/minority_only.py (the control without celebrities).
"""

from configs import base

MINORITY_BIOS = dict(multi=1, permute=True, permute_copies=1)   # single+permute1
STAR_BIOS = dict(multi=5, permute=True)                          # multi5+permute


def get_config(arg: str = "paper"):
  return base.grouped_row(arg, "celeb_minority", 6 / 5,
                          minority=base.group(5 / 6, 0.5, 0.0, **MINORITY_BIOS),
                          star=base.group(1 / 6, 0.5, 0.5, **STAR_BIOS))
