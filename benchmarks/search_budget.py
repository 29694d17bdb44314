"""How the searches met their budgets, and whether their widths just follow the cost of a channel.

Reads every PaS search of a results folder (results/seed*/models/pas/*/search/masks.json, with the
pretrained network's channel graph rebuilt from the masks' backbone) and prints per search:
- searched/target: the MACs of the gates' own masks at the end of the search over the target (the
  constraint objective's goal: within 2%), and the share of the full MACs the landing then moved;
- min fraction: the smallest kept fraction of any group (the floor holds);
- rho(cost): Spearman's rank correlation over the searched groups between the MACs one more channel
  costs (at full width) and the kept fraction. -1: the widths are the per-channel cost order (the
  collapse the paper's form showed on MobileNetV2); 0: unrelated to it. The same for every baseline
  of the same target, for comparison (uniform width is about 0 by construction).

    python -m benchmarks.search_budget [--results results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pas.models import arch_for
from pas.search import Budget, marginal_costs


def _row(path: Path, method: str) -> dict:
    record = json.loads(path.read_text())
    model = path.parent.parent.name if method == "pas" else path.parent.name
    seed = next(p.name for p in path.parents if p.name.startswith("seed"))
    # the embedded default's 28x28 grey images and 10 classes where an older record does not say
    shape = {"in_channels": 1, "num_classes": 10, "resolution": 28} | \
        {k: record[k] for k in ("in_channels", "num_classes", "resolution") if k in record}
    arch = arch_for(record["backbone"], **shape)
    costs = marginal_costs(arch, Budget(1, int(arch.macs())), arch.full_widths())
    fractions = [w / f for w, f in zip(record["widths"], record["full_widths"])]
    rho = pd.Series(costs).corr(pd.Series(fractions), method="spearman")
    target, searched = record.get("target_macs"), record.get("searched_macs")
    return {"seed": seed, "model": model, "method": method, "objective": record.get("objective", ""),
            "searched/target": searched / target if method == "pas" and target and searched else None,
            "landing moved": record.get("landing_moved_macs_share") if method == "pas" else None,
            "min fraction": min(fractions), "rho(cost)": rho}


def table(results: Path) -> pd.DataFrame:
    rows = [_row(p, "pas") for p in sorted(results.glob("seed*/models/pas/*/search/masks.json"))]
    for p in sorted(results.glob("seed*/models/*/*/masks.json")):
        method = p.parent.parent.name
        if method not in ("pas", "full", "scratch", "scratch_long"):
            rows.append(_row(p, method))
    return pd.DataFrame(rows)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", type=Path)
    args = parser.parse_args(argv)
    frame = table(args.results)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return frame


if __name__ == "__main__":
    main()
