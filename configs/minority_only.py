"""The control of configs/celeb_minority.py: the same minority people and bios (person ids
[0, data.n_people), single+permute1) with no celebrities. QA finetune on half of the minority,
QA eval on the other half (PAPER.md: 4.4%, the single+permute1 row). Scales and variants as
any row: `:tiny`, `:small`."""

from configs import base, celeb_minority


def get_config(arg: str = "paper"):
  return base.grouped_row(arg, "minority_only", 1.0,
                          minority=base.group(1.0, 1.0, 0.5, **celeb_minority.MINORITY_BIOS))
