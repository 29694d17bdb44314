"""7. The default workflow's wall time on this machine, from Snakemake's benchmark files.

Each job's benchmark file is written when the job ends and holds its wall seconds (`s`), so a run
spans from min(end - s) to max(end). The sum of the jobs' seconds over that span is the mean number
of jobs that ran at once. With several seeds (results/seed<N>/) each seed's jobs are timed on their
own: a seed is one whole default run, and the goal applies to it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def job_times(files: list[Path], results: Path) -> pd.DataFrame:
    """One row per job: its rule, seed folder (None outside one), wall seconds `s` (the first row of
    its benchmark file), and when it started and ended."""
    jobs = pd.DataFrame({
        "rule": [f.name.removesuffix(".benchmark.tsv") for f in files],
        "seed": [next((p for p in f.relative_to(results).parts if p.startswith("seed")), None) for f in files],
        "s": [float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files],
        "end": [f.stat().st_mtime for f in files]})
    return jobs.assign(start=jobs["end"] - jobs["s"])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--goal-minutes", type=float, default=20.0)
    a = p.parse_args(argv)
    files = sorted(Path(a.results).rglob("*.benchmark.tsv"))
    if not files:
        print(f"workflow time: no benchmark files under {a.results} (run `snakemake --cores all` first)")
        return []
    jobs = job_times(files, Path(a.results))
    wall = jobs["end"].max() - jobs["start"].min()
    total = jobs["s"].sum()
    print(f"workflow: {len(jobs)} jobs, wall {wall / 60:.1f} min, job seconds {total / 60:.1f} min, "
          f"{total / wall:.2f} jobs at once on average")
    rows = []
    seeds = jobs.dropna(subset=["seed"]).groupby("seed").agg(jobs=("s", "size"), start=("start", "min"),
                                                              end=("end", "max"), busy=("s", "sum"))
    for seed, g in seeds.iterrows():
        span = g["end"] - g["start"]
        print(f"  {seed}: {int(g['jobs'])} jobs, wall {span / 60:.1f} min (goal <= {a.goal_minutes:g} min: "
              f"{'met' if span <= a.goal_minutes * 60 else 'MISSED'}), job seconds {g['busy'] / 60:.1f} min")
        rows.append({"benchmark": f"default workflow wall time, {seed} (min)", "ratio": span / 60,
                     "goal": f"<= {a.goal_minutes:g}"})
    for rule, s in jobs.groupby("rule", sort=False)["s"].sum().sort_values(ascending=False, kind="stable").items():
        print(f"  {rule:>16}: {s / 60:6.1f} min in all")
    return rows


if __name__ == "__main__":
    main()
