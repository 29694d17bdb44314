"""The paper's claims measured over every seed of a run, from the results table and the masks and
search histories of every pruned row:

    accuracy       top-1 mean, spread (sample std), min and max per method at each target, and of the
                   reference rows (CSV, Markdown, LaTeX, and a plot with error bars)
    convergence    when the gates settle: the search epoch after which the kept channels per layer stay
                   within 1% of their final counts (and when they stop changing at all)
    comparisons    PaS minus each baseline at each target, paired by seed, and minus the scratch
                   member at its MACs, with a 95% Student t interval and a verdict from it: ahead,
                   behind or within noise (CSV, Markdown)
    width profile  the fraction of channels kept at each feature-map resolution, per method
    claims.md      each claim, what was measured and whether it holds here
    verdicts.json  each claim's verdict and the measured sentence it follows from

One row of input per pruned network and seed: `--run method=pas,model=PaS-A,seed=0,masks=PATH,history=PATH`
(history only for PaS).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd

from pas.config import BASELINES, SCRATCH_METHODS
from pas.errors import PasError
from pas.io import atomic_write_text, read_json
from pas.plots import SCRATCH_MATCH, plot_accuracy_macs, save_figure, scratch_for, search_progress
from pas.tables import METHOD_ORDER, as_records, csv_text, latex_text, markdown_text, parse_spec, read_table

RUN_KEYS = ("method", "model", "seed", "masks", "history")
SETTLE_FRACTION = 0.01  # of the final kept channels: "settled" = within this L1 distance from now on


def parse_run_spec(text: str) -> dict[str, str]:
    spec = parse_spec(text, what="run", keys=RUN_KEYS, value="VALUE")
    missing = [k for k in ("method", "model", "seed", "masks") if k not in spec]
    if missing:
        raise PasError(f"run {text!r} has no {missing[0]}=...")
    if spec["method"] == "pas" and "history" not in spec:
        raise PasError(f"run {text!r}: a pas run needs history=PATH (its search history)")
    return spec


# -- accuracy --------------------------------------------------------------------------------------

ACCURACY_COLUMNS = ["model", "backbone", "method", "target_macs", "macs", "seeds", "top1_mean", "top1_std",
                    "top1_min", "top1_max", "top5_mean"]


def accuracy_rows(rows) -> list[dict]:
    """One row per (model, method) over the seeds of the table's rows (dicts or a frame): seeds, top-1
    mean, sample std (None for one seed), min and max, mean MACs and top-5; models in the table's
    order (a baseline's row under the variant it was pruned for), methods as METHOD_ORDER."""
    frame = pd.DataFrame(rows)
    model = frame["model"].str.split("@").str[-1]
    frame = frame.assign(model=model, model_order=pd.factorize(model)[0],
                         method_order=frame["method"].map({m: i for i, m in enumerate(METHOD_ORDER)}))
    acc = frame.dropna(subset=["method_order"]).groupby(["model_order", "method_order"]).agg(
        model=("model", "first"), backbone=("backbone", "first"), method=("method", "first"),
        target_macs=("target_macs", "first"), macs=("macs", "mean"), seeds=("top1", "count"),
        top1_mean=("top1", "mean"), top1_std=("top1", "std"), top1_min=("top1", "min"), top1_max=("top1", "max"),
        top5_mean=("top5", "mean"))
    return as_records(acc.reset_index(drop=True)[ACCURACY_COLUMNS])


def _num(value, digits=2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _macs(value) -> str:
    if value is None:
        return ""
    return f"{value / 1e9:.3f}G" if value >= 1e9 else f"{value / 1e6:.3f}M"


def _accuracy_cells(r: dict) -> list[str]:
    std = "" if r["top1_std"] is None else f" ± {r['top1_std']:.2f}"
    return [r["model"], r["method"], _macs(r["target_macs"]), _macs(r["macs"]), str(r["seeds"]),
            f"{r['top1_mean']:.2f}{std}", f"{r['top1_min']:.2f}-{r['top1_max']:.2f}"]


ACCURACY_HEADINGS = ["model", "method", "target MACs", "MACs", "seeds", "top-1 % (mean ± std)", "top-1 min-max"]
ACCURACY_ALIGN = "llrrrrr"  # text left, numbers right


def accuracy_display(rows: list[dict]) -> pd.DataFrame:
    """The accuracy table as shown: text cells under ACCURACY_HEADINGS."""
    return pd.DataFrame([_accuracy_cells(r) for r in rows], columns=ACCURACY_HEADINGS)


def accuracy_markdown(rows: list[dict]) -> str:
    return markdown_text(accuracy_display(rows), ACCURACY_ALIGN)


def accuracy_latex(rows: list[dict]) -> str:
    return latex_text(accuracy_display(rows), ACCURACY_ALIGN)


# -- paired comparisons ----------------------------------------------------------------------------

CONFIDENCE = 0.95
ONE_SEED = "one seed: no interval"


def t_quantile(dof: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t quantile t_{(1 + confidence)/2, dof} (4.303 for 2 dof at 95%)."""
    from scipy.stats import t
    if not dof > 0:
        raise PasError(f"t quantile for {dof} degrees of freedom: expected a positive number")
    return float(t.ppf((1 + confidence) / 2, dof))


def paired_interval(diffs: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean d and sample std s of the n paired differences, and the interval
    d ± t_{(1+confidence)/2, n-1} · s / sqrt(n); t, low and high are None for one pair."""
    n = len(diffs)
    if n == 0:
        raise PasError("no paired differences: expected at least one seed with both rows")
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"diff_mean": mean, "diff_std": None, "dof": None, "t": None, "ci_low": None, "ci_high": None}
    std = statistics.stdev(diffs)
    t = t_quantile(n - 1, confidence)
    half = t * std / math.sqrt(n)
    return {"diff_mean": mean, "diff_std": std, "dof": float(n - 1), "t": t, "ci_low": mean - half,
            "ci_high": mean + half}


def welch_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> dict:
    """Difference of means d = mean(a) - mean(b) of two independent samples and Welch's interval
    d ± t_{(1+confidence)/2, v} · se, se² = s_a²/n_a + s_b²/n_b, with the Welch-Satterthwaite
    v = se⁴ / ((s_a²/n_a)²/(n_a-1) + (s_b²/n_b)²/(n_b-1)); no interval (None) when a side has one
    value; the point d when both spreads are zero."""
    if not a or not b:
        raise PasError("Welch interval of an empty sample: expected a value on both sides")
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff_mean": mean, "diff_std": None, "dof": None, "t": None, "ci_low": None, "ci_high": None}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff_mean": mean, "diff_std": 0.0, "dof": None, "t": None, "ci_low": mean, "ci_high": mean}
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = t_quantile(dof, confidence)
    return {"diff_mean": mean, "diff_std": se, "dof": dof, "t": t, "ci_low": mean - t * se, "ci_high": mean + t * se}


def interval_verdict(low, high) -> str:
    """'ahead' when the interval of PaS minus the other lies entirely above 0, 'behind' entirely
    below 0, 'within noise' when it contains 0; ONE_SEED without an interval."""
    if low is None or high is None:
        return ONE_SEED
    return "ahead" if low > 0 else "behind" if high < 0 else "within noise"


COMPARISON_COLUMNS = ["model", "backbone", "target_macs", "against", "against_model", "test", "seeds_pas",
                      "seeds_against", "pas_top1", "against_top1", "diff_mean", "diff_std", "dof", "t", "ci_low",
                      "ci_high", "verdict"]


def _top1_by_seed(frame: pd.DataFrame, what: str) -> pd.Series:
    """top-1 indexed by seed; two rows of one seed are an error (the pairing would be ambiguous)."""
    duplicated = frame["seed"][frame["seed"].duplicated()]
    if not duplicated.empty:
        raise PasError(f"the table has two rows of {what} for seed {duplicated.iloc[0]}; expected one per seed")
    return frame.set_index("seed")["top1"]


def comparison_rows(rows) -> list[dict]:
    """PaS against each baseline at each target, paired by seed (the same pretrained network:
    paired_interval of PaS top-1 minus the baseline's), and against each scratch member at its MACs
    (independent trainings: welch_interval); a verdict from each 95% interval."""
    frame = pd.DataFrame(rows)
    frame = frame.assign(target=frame["model"].str.split("@").str[-1])
    scratch = frame[frame["method"].isin(SCRATCH_METHODS)]
    members = scratch.groupby("model", sort=False)["macs"].mean().to_dict()
    method_of = scratch.groupby("model", sort=False)["method"].first().to_dict()
    out = []
    for target, pas in frame[frame["method"] == "pas"].groupby("target", sort=False):
        mine = _top1_by_seed(pas, f"pas {target}")
        base = {"model": target, "backbone": pas["backbone"].iloc[0], "target_macs": pas["target_macs"].iloc[0]}
        for baseline in BASELINES:
            theirs = frame[(frame["method"] == baseline) & (frame["target"] == target)]
            if theirs.empty:
                continue
            theirs = _top1_by_seed(theirs, f"{baseline} {target}")
            seeds = mine.index.intersection(theirs.index)  # only the seeds both rows have are pairs
            if seeds.empty:
                continue
            stats = paired_interval((mine[seeds] - theirs[seeds]).tolist())
            out.append({**base, "against": baseline, "against_model": f"{baseline}@{target}", "test": "paired t",
                        "seeds_pas": len(seeds), "seeds_against": len(seeds), "pas_top1": mine[seeds].mean(),
                        "against_top1": theirs[seeds].mean(), **stats})
        for member in scratch_for(base["target_macs"], members):
            theirs = scratch.loc[scratch["model"] == member, "top1"].tolist()
            stats = welch_interval(mine.tolist(), theirs)
            out.append({**base, "against": method_of[member], "against_model": member, "test": "Welch t",
                        "seeds_pas": len(mine), "seeds_against": len(theirs), "pas_top1": mine.mean(),
                        "against_top1": statistics.fmean(theirs), **stats})
    for r in out:
        r["verdict"] = interval_verdict(r["ci_low"], r["ci_high"])
    return out


def _interval(r: dict) -> str:
    return "" if r["ci_low"] is None else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"


COMPARISON_HEADINGS = ["model", "target MACs", "against", "test", "seeds", "PaS top-1", "other top-1",
                       "PaS − other (mean)", "95% interval", "verdict"]


def comparison_display(comparisons: list[dict]) -> pd.DataFrame:
    """The comparison table as shown: text cells under COMPARISON_HEADINGS."""
    cells = [[r["model"], _macs(r["target_macs"]), r["against_model"], r["test"],
              str(r["seeds_pas"]) if r["test"] == "paired t" else f"{r['seeds_pas']} / {r['seeds_against']}",
              f"{r['pas_top1']:.2f}", f"{r['against_top1']:.2f}", f"{r['diff_mean']:+.2f}", _interval(r), r["verdict"]]
             for r in comparisons]
    return pd.DataFrame(cells, columns=COMPARISON_HEADINGS)


def comparison_markdown(comparisons: list[dict]) -> str:
    note = (f"PaS top-1 minus the other's, with a {CONFIDENCE:.0%} Student t interval: paired by seed against "
            f"a baseline (pruned from the same pretrained network), Welch's for a scratch member (independent "
            f"trainings). Verdict: ahead (interval above 0), behind (below 0), within noise (contains 0).")
    return f"{note}\n\n{markdown_text(comparison_display(comparisons), 'llllrrrrrl')}"


# -- convergence -----------------------------------------------------------------------------------

def settle_point(history: dict, fraction: float = SETTLE_FRACTION) -> tuple[float, float]:
    """(position in search epochs after which the kept counts per layer stay within `fraction` of the
    final total in L1 distance, position after which they do not change at all). 0.0 = from the
    first record on."""
    records = history["records"]
    if not records:
        raise PasError("the search history has no records")
    x = search_progress(history)
    final = records[-1]["kept"]
    budget = fraction * sum(final)
    near = exact = 0.0
    for i in range(len(records) - 1, -1, -1):
        distance = sum(abs(a - b) for a, b in zip(records[i]["kept"], final))
        if distance > 0 and not exact:
            exact = x[i + 1]
        if distance > budget:
            near = x[i + 1]
            break
    return near, exact


CONVERGENCE_COLUMNS = ["model", "seed", "settled_epoch", "unchanged_from_epoch", "final_kept", "full"]


def convergence_rows(runs: list[dict], histories: dict) -> list[dict]:
    out = []
    for run in runs:
        if run["method"] != "pas":
            continue
        h = histories[run["history"]]
        near, exact = settle_point(h)
        out.append({"model": run["model"], "seed": run["seed"], "settled_epoch": round(near, 3),
                    "unchanged_from_epoch": round(exact, 3), "final_kept": sum(h["records"][-1]["kept"]),
                    "full": sum(h["full_widths"])})
    return out


# -- width profile ---------------------------------------------------------------------------------

def keep_by_resolution(masks: dict) -> dict[int, float]:
    """{feature-map side: kept / full channels of the searchable layers at that side}, largest first."""
    sizes = masks.get("layer_sizes")
    if sizes is None:
        raise PasError("the masks record has no layer_sizes (written by pas search/prune since 0.1)")
    kept, full = {}, {}
    for size, w, f in zip(sizes, masks["widths"], masks["full_widths"]):
        kept[size] = kept.get(size, 0) + w
        full[size] = full.get(size, 0) + f
    return {s: kept[s] / full[s] for s in sorted(kept, reverse=True)}


PROFILE_COLUMNS = ["model", "backbone", "method", "resolution", "seeds", "keep_mean", "keep_std"]


def profile_rows(runs: list[dict], masks: dict, backbones: dict[str, str]) -> list[dict]:
    """One row per (model, method) and feature-map side over the seeds: seeds, mean and sample std
    (None for one seed) of the kept fraction, rounded to 4 places; in the runs' order, largest side
    first."""
    kept = pd.DataFrame([{"model": run["model"], "method": run["method"], "resolution": size, "keep": keep}
                         for run in runs for size, keep in keep_by_resolution(masks[run["masks"]]).items()],
                        columns=["model", "method", "resolution", "keep"])
    stats = kept.groupby(["model", "method", "resolution"], sort=False)["keep"].agg(
        seeds="count", keep_mean="mean", keep_std="std").reset_index()
    stats["backbone"] = stats["model"].map(backbones).fillna("")
    stats[["keep_mean", "keep_std"]] = stats[["keep_mean", "keep_std"]].round(4)
    return as_records(stats[PROFILE_COLUMNS])


def early_pruned_harder(masks: dict) -> bool:
    """The highest-resolution layers keep a smaller fraction than all lower-resolution ones together."""
    sizes = masks["layer_sizes"]
    top = max(sizes)
    hi = [(w, f) for s, w, f in zip(sizes, masks["widths"], masks["full_widths"]) if s == top]
    lo = [(w, f) for s, w, f in zip(sizes, masks["widths"], masks["full_widths"]) if s != top]
    if not lo:
        return False
    return sum(w for w, _ in hi) / sum(f for _, f in hi) < sum(w for w, _ in lo) / sum(f for _, f in lo)


# -- claims ----------------------------------------------------------------------------------------

def _pm(r: dict) -> str:
    return f"{r['top1_mean']:.2f}" + ("" if r["top1_std"] is None else f" ± {r['top1_std']:.2f}")


def _table(headings: list[str], rows: list[list[str]], align: str) -> list[str]:
    """The lines of a Markdown table of text cells (`align`: 'l' or 'r' per column)."""
    return markdown_text(pd.DataFrame(rows, columns=headings), align).splitlines()


def _profile_cells(profile: list[dict]) -> list[list[str]]:
    """[model, method, '14px 38%, 7px 50%, ...'] per (model, method) of the width profile."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in profile:
        groups.setdefault((p["model"], p["method"]), []).append(f"{p['resolution']}px {100 * p['keep_mean']:.0f}%")
    return [[model, method, ", ".join(cells)] for (model, method), cells in groups.items()]


def overall_verdict(verdicts: list[str]) -> str:
    """A claim that PaS is ahead: 'holds' when every comparison says ahead, 'holds in part' when some
    do; when none does, 'does not hold' if one says behind, 'not shown' if all are within noise (no
    evidence either way); 'untested' when no comparison has an interval (one seed)."""
    if all(v == ONE_SEED for v in verdicts):
        return "untested"
    ahead = sum(v == "ahead" for v in verdicts)
    if ahead:
        return "holds" if ahead == len(verdicts) else "holds in part"
    return "does not hold" if "behind" in verdicts else "not shown"


def _tally(verdicts: list[str]) -> str:
    """'ahead at 1, within noise at 2, behind at 0 of 3' (and how many had one seed, if any)."""
    counts = {v: verdicts.count(v) for v in ("ahead", "within noise", "behind", ONE_SEED)}
    text = f"ahead at {counts['ahead']}, within noise at {counts['within noise']}, behind at {counts['behind']}"
    return text + (f", {ONE_SEED} at {counts[ONE_SEED]}" if counts[ONE_SEED] else "") + f" of {len(verdicts)}"


def _comparison_cells(comparisons: list[dict]) -> list[list[str]]:
    shown = comparison_display(comparisons)
    return shown[["model", "against", "seeds", "PaS − other (mean)", "95% interval", "verdict"]].values.tolist()


def _verdict_note(verdict: str) -> str:
    return f" ({ONE_SEED})" if verdict == "untested" else ""


def claim_baselines(acc: list[dict], comparisons: list[dict]) -> dict | None:
    """Claim 1: PaS ahead of uniform width and magnitude pruning at equal MACs, by the paired intervals."""
    pairs = [c for c in comparisons if c["against"] in BASELINES]
    if not pairs:
        return None
    by_model: dict[str, dict[str, dict]] = {}
    for r in acc:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    means = [[m, _macs(g["pas"]["target_macs"]), _pm(g["pas"]), *(_pm(g[b]) if b in g else "" for b in BASELINES)]
             for m, g in by_model.items() if "pas" in g and any(b in g for b in BASELINES)]
    per_baseline = [f"{b}: {_tally([c['verdict'] for c in pairs if c['against'] == b])} targets"
                    for b in BASELINES if any(c["against"] == b for c in pairs)]
    verdict = overall_verdict([c["verdict"] for c in pairs])
    measured = (f"Paired by seed (the same pretrained network), PaS is {_tally([c['verdict'] for c in pairs])} "
                f"comparisons ({CONFIDENCE:.0%} Student t interval of the per-seed differences). Against each "
                f"baseline: " + "; ".join(per_baseline) + ".")
    lines = ["Paper: +0.3 to +2.7 top-1 over the baselines at equal MACs (ImageNet, RepVGG-B1).", "",
             *_table(["model", "target", "PaS", "uniform", "BN-gamma", "L1"], means, "lrrrrr"), "",
             *_table(["model", "against", "seeds", "PaS − other (mean)", "95% interval", "verdict"],
                     _comparison_cells(pairs), "llrrrl"), "", f"Measured: {measured}"]
    return {"claim": "1", "title": "PaS beats uniform width and magnitude pruning at equal MACs", "lines": lines,
            "verdict": verdict, "measured": measured, "suffix": " at this scale"}


def claim_scratch(comparisons: list[dict]) -> dict | None:
    """Claim 1b: PaS ahead of the smaller family member trained from scratch at its MACs (Welch)."""
    pairs = [c for c in comparisons if c["against"] in SCRATCH_METHODS]
    if not pairs:
        return None
    verdict = overall_verdict([c["verdict"] for c in pairs])
    measured = (f"Against the family member trained from scratch at each target's MACs (within "
                f"{SCRATCH_MATCH:.0%}; with the backbone's schedule, and where the table has it for PaS's total "
                f"epochs, named -<epochs>ep), PaS is {_tally([c['verdict'] for c in pairs])} comparisons "
                f"({CONFIDENCE:.0%} Welch t interval: independent trainings, not paired).")
    lines = ["Paper: about +1.0 top-1 over uniform RepVGG at similar speed.", "",
             *_table(["model", "from scratch", "seeds", "PaS − other (mean)", "95% interval", "verdict"],
                     _comparison_cells(pairs), "llrrrl"), "", f"Measured: {measured}"]
    return {"claim": "1b", "title": "PaS beats the uniform smaller family member at the same MACs", "lines": lines,
            "verdict": verdict, "measured": measured, "suffix": ""}


LANDING_WARNING = 0.05  # of the full MACs: a landing that moved more says the search had not converged


def landing_rows(runs: list[dict], masks: dict) -> list[dict]:
    """How far each PaS search got on its own: the share of the full network's MACs the landing
    after it moved (masks.json's landing_moved_macs_share), per variant and seed."""
    return [{"model": r["model"], "seed": r["seed"], "share": masks[r["masks"]]["landing_moved_macs_share"]}
            for r in runs if r["method"] == "pas"
            and masks[r["masks"]].get("landing_moved_macs_share") is not None]


def landing_sentence(landing: list[dict]) -> str:
    if not landing:
        return ""
    worst = max(landing, key=lambda r: r["share"])
    over = sum(r["share"] > LANDING_WARNING for r in landing)
    return (f" The landing after the search moved {100 * statistics.fmean(r['share'] for r in landing):.1f}% of the "
            f"full MACs on average (at most {100 * worst['share']:.1f}%, {worst['model']} seed {worst['seed']}); "
            f"more than {100 * LANDING_WARNING:.0f}% in {over} of {len(landing)} searches, which had not reached "
            f"their target on their own.")


def claim_convergence(conv: list[dict], search_epochs: int, landing: list[dict] = ()) -> dict | None:
    """Claim 2: the gates settle (within 1% of their final counts) before the last search epoch; with
    how much of the full MACs the landing after each search still had to move."""
    if not conv:
        return None
    latest = max(c["settled_epoch"] for c in conv)
    settled = sum(c["settled_epoch"] <= search_epochs - 1 for c in conv)
    measured = (f"Over {len(conv)} searches of {search_epochs} epochs, the kept channels per layer stay within "
                f"1% of their final counts from search epoch {statistics.fmean(c['settled_epoch'] for c in conv):.2f} "
                f"on average (latest {latest:.2f}); they stop changing at all from epoch "
                f"{statistics.fmean(c['unchanged_from_epoch'] for c in conv):.2f} on average "
                f"(latest {max(c['unchanged_from_epoch'] for c in conv):.2f}). Settled before the last search epoch "
                f"in {settled} of {len(conv)} searches.{landing_sentence(list(landing))}")
    lines = ["Paper: kept counts settle well within the 10 search epochs.", "",
             *_table(["model", "seed", "within 1% from epoch", "unchanged from epoch", "kept / full channels"],
                     [[c["model"], str(c["seed"]), f"{c['settled_epoch']:.2f}", f"{c['unchanged_from_epoch']:.2f}",
                       f"{c['final_kept']} / {c['full']}"] for c in conv], "lrrrr"), "", f"Measured: {measured}"]
    verdict = "holds" if settled == len(conv) else "holds in part" if settled else "does not hold"
    return {"claim": "2", "title": "The gates settle within the search epochs", "lines": lines, "verdict": verdict,
            "measured": measured, "suffix": ""}


def claim_profile(profile: list[dict], runs: list[dict], masks: dict) -> dict | None:
    """Claim 3: the highest-resolution layers keep a smaller fraction of their channels."""
    pas_runs = [r for r in runs if r["method"] == "pas"]
    if not pas_runs:
        return None
    harder = sum(early_pruned_harder(masks[r["masks"]]) for r in pas_runs)
    measured = (f"In {harder} of {len(pas_runs)} PaS searches the highest-resolution layers keep a smaller "
                f"fraction than all lower-resolution layers together.")
    lines = ["Paper: the high-resolution early stages keep 12-26% of their channels, stage 3 keeps 43-65% "
             "(RepVGG-B1).", "",
             *_table(["model", "method", "keep fraction per feature-map side (mean over seeds)"],
                     _profile_cells(profile), "lll"), "", f"Measured: {measured}"]
    verdict = "holds" if harder == len(pas_runs) else "holds in part" if harder else "does not hold"
    return {"claim": "3", "title": "Early high-resolution layers are pruned harder", "lines": lines,
            "verdict": verdict, "measured": measured, "suffix": ""}


def claims(acc: list[dict], comparisons: list[dict], conv: list[dict], profile: list[dict], runs: list[dict],
           masks: dict, search_epochs: int) -> list[dict]:
    """Every claim the run can test: claim number, title, Markdown body lines, verdict and the
    measured sentence the verdict follows from."""
    found = (claim_baselines(acc, comparisons), claim_scratch(comparisons),
             claim_convergence(conv, search_epochs, landing_rows(runs, masks)), claim_profile(profile, runs, masks))
    return [c for c in found if c is not None]


def claims_markdown(acc: list[dict], comparisons: list[dict], conv: list[dict], profile: list[dict],
                    runs: list[dict], masks: dict, search_epochs: int) -> str:
    seeds = max((r["seeds"] for r in acc), default=0)
    lines = [f"# The paper's claims at this run's scale ({seeds} seed{'s' * (seeds != 1)})", ""]
    for c in claims(acc, comparisons, conv, profile, runs, masks, search_epochs):
        lines += [f"## {c['claim']}. {c['title']}", *c["lines"],
                  f"**Verdict: {c['verdict']}**{c['suffix']}{_verdict_note(c['verdict'])}.", ""]
    return "\n".join(lines)


def verdicts_json(found: list[dict]) -> str:
    """The verdict of every claim with the measured sentence it follows from (for captions, READMEs)."""
    return json.dumps({"claims": [{k: c[k] for k in ("claim", "title", "verdict", "measured")} for c in found]},
                      indent=2, ensure_ascii=False) + "\n"


# -- entry point -----------------------------------------------------------------------------------

def make_evidence(table: str | Path, runs: list[dict], out_dir: str | Path, search_epochs: int) -> list[Path]:
    rows = read_table(table)
    if rows.empty:
        raise PasError(f"{str(table)!r} has no rows")
    masks = {r["masks"]: read_json(r["masks"]) for r in runs}
    histories = {r["history"]: read_json(r["history"]) for r in runs if "history" in r}
    acc = accuracy_rows(rows)
    conv = convergence_rows(runs, histories)
    backbones = dict(zip(rows["model"].str.split("@").str[-1], rows["backbone"]))
    profile = profile_rows(runs, masks, backbones)
    comparisons = comparison_rows(rows)
    found = claims(acc, comparisons, conv, profile, runs, masks, search_epochs)
    out_dir = Path(out_dir)
    written = {
        "accuracy.csv": csv_text(pd.DataFrame(acc, columns=ACCURACY_COLUMNS)),
        "accuracy.md": accuracy_markdown(acc),
        "accuracy.tex": accuracy_latex(acc),
        "convergence.csv": csv_text(pd.DataFrame(conv, columns=CONVERGENCE_COLUMNS)),
        "width_profile.csv": csv_text(pd.DataFrame(profile, columns=PROFILE_COLUMNS)),
        "comparisons.csv": csv_text(pd.DataFrame(comparisons, columns=COMPARISON_COLUMNS)),
        "comparisons.md": comparison_markdown(comparisons),
        "claims.md": claims_markdown(acc, comparisons, conv, profile, runs, masks, search_epochs),
        "verdicts.json": verdicts_json(found),
    }
    paths = []
    for name, text in written.items():
        atomic_write_text(out_dir / name, text)
        paths.append(out_dir / name)
    return paths + save_figure(plot_accuracy_macs(as_records(rows)), out_dir, "accuracy")


def main(args) -> int:
    if args.search_epochs < 1:
        raise PasError(f"--search-epochs {args.search_epochs}: expected a positive integer")
    runs = [parse_run_spec(text) for text in args.run]
    for path in make_evidence(args.table, runs, args.out_dir, args.search_epochs):
        print(path)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("evidence", help="the paper's claims over every seed (accuracy spread, gate "
                                        "convergence, width profile) from the results table and the masks")
    p.add_argument("--table", required=True, help="the CSV written by pas tables (every seed's rows)")
    p.add_argument("--run", action="append", required=True, metavar="method=M,model=N,seed=S,masks=PATH[,history=PATH]",
                   help="one pruned network of one seed (repeat); history: a PaS search's history")
    p.add_argument("--search-epochs", type=int, required=True, help="epochs of every search (the claim's horizon)")
    p.add_argument("--out-dir", required=True, help="writes accuracy.{csv,md,tex,png,pdf}, comparisons.{csv,md}, "
                                                    "convergence.csv, width_profile.csv, claims.md and "
                                                    "verdicts.json here")
    p.set_defaults(func=main)
