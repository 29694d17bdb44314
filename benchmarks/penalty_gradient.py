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

import argparse

import pandas as pd

from pas.evidence import interval_verdict, paired_interval
from pas.tables import markdown_text, read_table

SUFFIX = "-output"


def by_seed(frame: pd.DataFrame, method: str, model: str) -> pd.Series:
    rows = frame[(frame["method"] == method) & (frame["model"] == model)]
    return rows.set_index("seed")["top1"]


def interval(diffs: list[float]) -> str:
    """'mean [low, high] verdict' of the paired differences (95% Student t)."""
    stats = paired_interval(diffs)
    low, high = stats["ci_low"], stats["ci_high"]
    text = f"{stats['diff_mean']:+.2f}" + ("" if low is None else f" [{low:+.2f}, {high:+.2f}]")
    return f"{text} {interval_verdict(low, high)}"


def compare(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[float]]:
    pas = frame[frame["method"] == "pas"]
    names = [n for n in dict.fromkeys(pas["model"]) if not n.endswith(SUFFIX) and f"{n}{SUFFIX}" in set(pas["model"])]
    if not names:
        raise SystemExit(f"no PaS variant NAME with a NAME{SUFFIX} partner in the table: run config/penalty.yaml")
    cells, pooled = [], []
    for name in names:
        both, output = by_seed(frame, "pas", name), by_seed(frame, "pas", f"{name}{SUFFIX}")
        uniform = by_seed(frame, "uniform", f"uniform@{name}")
        seeds = both.index.intersection(output.index)
        diffs = (output[seeds] - both[seeds]).tolist()
        pooled += diffs
        moved = {m: frame.loc[(frame["method"] == "pas") & (frame["model"] == m), "landing_moved_share"].mean()
                 for m in (name, f"{name}{SUFFIX}")}
        vs_uniform = []
        for mine in (both, output):
            common = mine.index.intersection(uniform.index)
            vs_uniform.append(interval((mine[common] - uniform[common]).tolist()) if len(common) else "")
        cells.append([name, str(len(seeds)), f"{both[seeds].mean():.2f}", f"{output[seeds].mean():.2f}",
                      interval(diffs), vs_uniform[0], vs_uniform[1],
                      f"{100 * moved[name]:.1f} / {100 * moved[f'{name}{SUFFIX}']:.1f}"])
    table = pd.DataFrame(cells, columns=["variant", "seeds", "both top-1", "output top-1", "output − both (95%)",
                                         "both − uniform", "output − uniform", "landing moved % (both / output)"])
    return table, pooled


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="the run's results/tables/main.csv")
    args = p.parse_args(argv)
    table, pooled = compare(read_table(args.table))
    print(markdown_text(table, "lrrrllll"))
    print(f"\nAll targets pooled ({len(pooled)} pairs): output − both {interval(pooled)}")
    return table


if __name__ == "__main__":
    main()
