"""7. The default workflow's wall time on this machine, from Snakemake's benchmark files.

Each job's benchmark file is written when the job ends and holds its wall seconds (`s`), so a run
spans from min(end - s) to max(end). The sum of the jobs' seconds over that span is the mean number
of jobs that ran at once. With several seeds (results/seed<N>/) each seed's jobs are timed on their
own: a seed is one whole default run, and the goal applies to it.
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
    spans, per_rule, per_seed, total = [], defaultdict(float), defaultdict(list), 0.0
    for f in files:
        with f.open() as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        s = float(row["s"])
        end = f.stat().st_mtime
        spans.append((end - s, end))
        seed = next((part for part in f.relative_to(a.results).parts if part.startswith("seed")), None)
        if seed:
            per_seed[seed].append((end - s, end, s))
        per_rule[f.name.removesuffix(".benchmark.tsv")] += s
        total += s
    wall = max(e for _, e in spans) - min(b for b, _ in spans)
    print(f"workflow: {len(files)} jobs, wall {wall / 60:.1f} min, job seconds {total / 60:.1f} min, "
          f"{total / wall:.2f} jobs at once on average")
    rows = []
    for seed, jobs in sorted(per_seed.items()):
        span = max(e for _, e, _ in jobs) - min(b for b, _, _ in jobs)
        busy = sum(s for _, _, s in jobs)
        print(f"  {seed}: {len(jobs)} jobs, wall {span / 60:.1f} min (goal <= {a.goal_minutes:g} min: "
              f"{'met' if span <= a.goal_minutes * 60 else 'MISSED'}), job seconds {busy / 60:.1f} min")
        rows.append({"benchmark": f"default workflow wall time, {seed} (min)", "ratio": span / 60,
                     "goal": f"<= {a.goal_minutes:g}"})
    for rule, s in sorted(per_rule.items(), key=lambda kv: -kv[1]):
        print(f"  {rule:>16}: {s / 60:6.1f} min in all")
    return rows


if __name__ == "__main__":
    main()
