"""The accuracy cost of hardware-aligned widths, from a run of config/aligned.yaml.

Every PaS variant NAME searched with search.channel_multiple 1 has a partner NAME-x8 searched with
channel_multiple 8 (every width a multiple of 8, or the layer's full width) to the same target, from
the same pretrained backbone of each seed. Prints, per target: the MACs both landed on (mean over
the seeds), top-1 of each (mean), the paired difference x8 - x1 with its 95% Student t interval and
verdict, each one's difference to the uniform baseline at that target, and the share of the full
MACs the landing after the search moved. The last line pools every target's pairs. The speed side
of the same widths is `python -m benchmarks.pruning_efficiency --masks NAME=.../masks.json ...`.

    snakemake --cores all --configfile config/aligned.yaml
    python -m benchmarks.rounding_cost results/tables/main.csv
"""
from __future__ import annotations

import pandas as pd

from benchmarks.common import partner_comparison, partner_main

SUFFIX = "-x8"
LABELS = ("x1", "x8")


def compare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[float]]:
    table, pooled = partner_comparison(frame, SUFFIX, LABELS, "config/aligned.yaml")
    pas = frame[frame["method"] == "pas"]
    macs = pas.groupby("model")["macs"].mean()
    table.insert(2, "MACs (x1 / x8)", [f"{macs[n] / 1e3:.1f}K / {macs[n + SUFFIX] / 1e3:.1f}K" for n in table["variant"]])
    return table, pooled


def main(argv=None) -> pd.DataFrame:
    return partner_main(argv, __doc__, compare, LABELS, "lrlrrllll")


if __name__ == "__main__":
    main()
