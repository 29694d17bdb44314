"""7. The default workflow's wall time on this machine, from Snakemake's benchmark files.

Each job's benchmark file is written when the job ends and holds its wall seconds (`s`), so the
run spans from min(end - s) to max(end). The sum of the jobs' seconds over that span is the mean
number of jobs that ran at once.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--goal-minutes", type=float, default=20.0)
    a = p.parse_args(argv)
    files = sorted(Path(a.results).rglob("*.benchmark.tsv"))
    if not files:
        print(f"workflow time: no benchmark files under {a.results} (run `snakemake --cores all` first)")
        return []
    spans, per_rule, total = [], defaultdict(float), 0.0
    for f in files:
        with f.open() as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        s = float(row["s"])
        end = f.stat().st_mtime
        spans.append((end - s, end))
        per_rule[f.name.removesuffix(".benchmark.tsv")] += s
        total += s
    wall = max(e for _, e in spans) - min(b for b, _ in spans)
    print(f"workflow: {len(files)} jobs, wall {wall / 60:.1f} min (goal <= {a.goal_minutes:g} min: "
          f"{'met' if wall <= a.goal_minutes * 60 else 'MISSED'}), job seconds {total / 60:.1f} min, "
          f"{total / wall:.2f} jobs at once on average")
    for rule, s in sorted(per_rule.items(), key=lambda kv: -kv[1]):
        print(f"  {rule:>16}: {s / 60:6.1f} min in all")
    return [{"benchmark": "default workflow wall time (min)", "ratio": wall / 60, "goal": f"<= {a.goal_minutes:g}"}]


if __name__ == "__main__":
    main()
