"""The search objective, `constraint` against `paper`, from a run of config/objective.yaml.

Every PaS variant NAME searched with the default objective (`constraint`: the budget as a
constraint, the landing by importance per cost) has a partner NAME-paper searched with the paper's
form (the quadratic MACs penalty, the landing by gate weight) from the same pretrained backbone of
each seed. Prints, per target: top-1 of each (mean over the seeds), the paired difference
paper - constraint with its 95% Student t interval and verdict, each one's difference to the uniform
baseline at that target, and the share of the full MACs the landing after the search moved. The
last line pools every target's pairs.

    snakemake --cores all --configfile config/objective.yaml
    python -m benchmarks.objective results/tables/main.csv
"""
from __future__ import annotations

import pandas as pd

from benchmarks.common import partner_comparison, partner_main

SUFFIX = "-paper"
LABELS = ("constraint", "paper")


def compare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[float]]:
    return partner_comparison(frame, SUFFIX, LABELS, "config/objective.yaml")


def main(argv=None) -> pd.DataFrame:
    return partner_main(argv, __doc__, compare, LABELS, "lrrrllll")


if __name__ == "__main__":
    main()
