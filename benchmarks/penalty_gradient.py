"""The MACs penalty's gradient, `both` against `output`, from a run of config/penalty.yaml.

Every PaS variant NAME searched with search.penalty_gradient `both` has a partner NAME-output searched
with `output` (the input width detached, as in the authors' code) from the same pretrained backbone
of each seed. Prints, per target: top-1 of both (mean over the seeds), of output, the paired
difference output - both with its 95% Student t interval and verdict, each one's difference to the
uniform baseline at that target, and the share of the full MACs the landing after the search moved
(how far the search got on its own). The last line pools every target's pairs.

    snakemake --cores all --configfile config/penalty.yaml
    python -m benchmarks.penalty_gradient results/tables/main.csv
"""
from __future__ import annotations

import pandas as pd

from benchmarks.common import partner_comparison, partner_main

SUFFIX = "-output"
LABELS = ("both", "output")


def compare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[float]]:
    return partner_comparison(frame, SUFFIX, LABELS, "config/penalty.yaml")


def main(argv=None) -> pd.DataFrame:
    return partner_main(argv, __doc__, compare, LABELS, "lrrrllll")


if __name__ == "__main__":
    main()
