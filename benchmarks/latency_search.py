"""Search to a latency budget against search to a MACs budget, from a run of config/latency.yaml
(over seeds: add config/evidence.yaml).

Every PaS variant NAME searched to a MACs target has a partner NAME-latency searched to a share of
its backbone's latency (the share its MACs-targeted partner landed on when the config was written),
from the same pretrained backbone of each seed. The latency job times every deployed network side
by side, the full backbones too, so the portable measure is a share of the full network measured in
the same job. Prints, per pair: the MACs both landed on, the latency share the budget asked for (the
target over the full network's latency in the table, `results/latency_tables/BACKBONE.json`), the
share each one measured (at the table's batch and runtime; mean over the seeds) and the latency
one's measured share over its budget (every seed), top-1 of each and the paired difference
latency - MACs with its 95% Student t interval. The last line pools the pairs.

    snakemake --cores all --configfile config/latency.yaml config/evidence.yaml
    python -m benchmarks.latency_search results/tables/main.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmarks.common import interval, partner_comparison

SUFFIX = "-latency"
LABELS = ("MACs", "latency")


def measured_share(frame: pd.DataFrame, model: str, column: str) -> pd.Series:
    """A PaS row's measured latency over its full backbone's, per seed (the same latency job)."""
    rows = frame[(frame["method"] == "pas") & (frame["model"] == model)].set_index("seed")
    backbone = rows["backbone"].iloc[0]
    full = frame[(frame["method"] == "full") & (frame["model"] == backbone)].set_index("seed")[column]
    return (rows[column] / full).dropna()


def compare(frame: pd.DataFrame, tables: Path) -> tuple[pd.DataFrame, list[float]]:
    import json
    table, pooled = partner_comparison(frame, SUFFIX, LABELS, "config/latency.yaml with config/evidence.yaml")
    table = table.drop(columns=[c for c in table.columns if c.endswith("uniform")])
    extra = {"MACs (MACs / latency)": [], "budget share": [], "measured share (MACs / latency)": [],
             "latency: measured / budget, per seed": []}
    macs = frame[frame["method"] == "pas"].groupby("model")["macs"].mean()
    for name in table["variant"]:
        partner = name + SUFFIX
        row = frame[(frame["method"] == "pas") & (frame["model"] == partner)].iloc[0]
        lat = json.loads((tables / f"{row['backbone']}.json").read_text())
        runtime = "" if lat["runtime"] == "pytorch" else "ort_"
        column = f"{runtime}latency_ms_b{int(row['latency_table_batch'])}"
        budget = float(row["target_latency_ms"]) / lat["full_ms"]
        mine, theirs = measured_share(frame, name, column), measured_share(frame, partner, column)
        extra["MACs (MACs / latency)"].append(f"{macs[name] / 1e3:.1f}K / {macs[partner] / 1e3:.1f}K")
        extra["budget share"].append(f"{budget:.3f} ({column})")
        extra["measured share (MACs / latency)"].append(f"{mine.mean():.3f} / {theirs.mean():.3f}")
        extra["latency: measured / budget, per seed"].append(" ".join(f"{v / budget:.2f}" for v in theirs))
    for i, (k, v) in enumerate(extra.items()):
        table.insert(2 + i, k, v)
    return table, pooled


def main(argv=None) -> pd.DataFrame:
    from pas.tables import markdown_text, read_table
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="the run's results/tables/main.csv")
    p.add_argument("--tables", help="the run's latency tables (default: results/latency_tables beside the table)")
    args = p.parse_args(argv)
    tables = Path(args.tables) if args.tables else Path(args.table).resolve().parent.parent / "latency_tables"
    table, pooled = compare(read_table(args.table), tables)
    print(markdown_text(table, "l" + "r" * (len(table.columns) - 1)))
    print(f"\nAll pairs pooled ({len(pooled)}): {LABELS[1]} − {LABELS[0]} top-1 {interval(pooled)}")
    return table


if __name__ == "__main__":
    main()
