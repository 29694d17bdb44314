"""The paper's claims measured over every seed of a run, from the results table and the masks and
search histories of every pruned row:

    accuracy       top-1 mean, spread (sample std), min and max per method at each target, and of the
                   reference rows (CSV, Markdown, LaTeX, and a plot with error bars)
    convergence    when the gates settle: the search epoch after which the kept channels per layer stay
                   within 1% of their final counts (and when they stop changing at all)
    width profile  the fraction of channels kept at each feature-map resolution, per method
    claims.md      each claim, what was measured and whether it holds here

One row of input per pruned network and seed: `--run method=pas,model=PaS-A,seed=0,masks=PATH,history=PATH`
(history only for PaS).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from pas.errors import PasError
from pas.io import atomic_write_text, read_json
from pas.plots import save_figure, search_progress
from pas.tables import (BASELINES, METHOD_ORDER, as_records, csv_text, latex_text, markdown_text, parse_spec,
                        read_table)

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


def plot_accuracy(rows: list[dict]):
    from pas.plots import MARKERS, grid
    backbones = list(dict.fromkeys(r["backbone"] for r in rows if r["method"] not in ("full", "scratch")))
    fig, axes = grid(max(1, len(backbones)), width=6, height=4.5)
    for ax, backbone in zip(axes, backbones):
        for i, method in enumerate(("pas", *BASELINES)):
            mine = sorted((r for r in rows if r["backbone"] == backbone and r["method"] == method),
                          key=lambda r: r["macs"])
            if mine:
                ax.errorbar([r["macs"] / 1e6 for r in mine], [r["top1_mean"] for r in mine],
                            yerr=[r["top1_std"] or 0.0 for r in mine], marker=MARKERS[method], capsize=3,
                            color=f"C{i}", label=method, ms=9 if method == "pas" else 6)
        family = backbone.split("_")[0]
        for r in rows:  # the full backbone, and the members of its family trained from scratch
            if (r["method"] == "full" and r["model"] == backbone) or (
                    r["method"] == "scratch" and r["model"].split("_")[0] == family):
                ax.errorbar([r["macs"] / 1e6], [r["top1_mean"]], yerr=[r["top1_std"] or 0.0],
                            marker=MARKERS[r["method"]], color="0.3", capsize=3, ls="none")
                ax.annotate(f"{r['method']} {r['model']}", (r["macs"] / 1e6, r["top1_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        n = max((r["seeds"] for r in rows), default=1)
        ax.set(title=f"{backbone}: top-1 over {n} seed{'s' * (n > 1)} (mean ± std)", xlabel="MACs (M)",
               ylabel="top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


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


def _against(by_model: dict, targets: list[str], baseline: str) -> str:
    """'uniform: PaS ahead at 4 of 6 targets, by +0.52 on average'."""
    diffs = [by_model[m]["pas"]["top1_mean"] - by_model[m][baseline]["top1_mean"] for m in targets
             if baseline in by_model[m]]
    return (f"{baseline}: PaS ahead at {sum(d > 0 for d in diffs)} of {len(diffs)} targets, by "
            f"{statistics.fmean(diffs):+.2f} on average")


def _table(headings: list[str], rows: list[list[str]], align: str) -> list[str]:
    """The lines of a Markdown table of text cells (`align`: 'l' or 'r' per column)."""
    return markdown_text(pd.DataFrame(rows, columns=headings), align).splitlines()


def _profile_cells(profile: list[dict]) -> list[list[str]]:
    """[model, method, '14px 38%, 7px 50%, ...'] per (model, method) of the width profile."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in profile:
        groups.setdefault((p["model"], p["method"]), []).append(f"{p['resolution']}px {100 * p['keep_mean']:.0f}%")
    return [[model, method, ", ".join(cells)] for (model, method), cells in groups.items()]


def claims_markdown(acc: list[dict], conv: list[dict], profile: list[dict], runs: list[dict], masks: dict,
                    search_epochs: int) -> str:
    seeds = max((r["seeds"] for r in acc), default=0)
    lines = [f"# The paper's claims at this run's scale ({seeds} seed{'s' * (seeds != 1)})", ""]
    # 1. PaS vs the baselines at equal MACs
    by_model: dict[str, dict[str, dict]] = {}
    for r in acc:
        by_model.setdefault(r["model"], {})[r["method"]] = r
    targets = [m for m, g in by_model.items() if "pas" in g and any(b in g for b in BASELINES)]
    wins = clear = 0
    detail = []
    for m in targets:
        g = by_model[m]
        pas = g["pas"]
        others = [g[b] for b in BASELINES if b in g]
        best = max(others, key=lambda r: r["top1_mean"])
        margin = pas["top1_mean"] - best["top1_mean"]
        wins += margin > 0
        apart = pas["top1_std"] is not None and best["top1_std"] is not None and \
            pas["top1_mean"] - pas["top1_std"] > best["top1_mean"] + best["top1_std"]
        clear += apart
        detail.append([m, _macs(pas["target_macs"]), _pm(pas), *(_pm(g[b]) if b in g else "" for b in BASELINES),
                       best["method"], f"{margin:+.2f}"])
    if targets:
        lines += ["## 1. PaS beats uniform width and magnitude pruning at equal MACs",
                  "Paper: +0.3 to +2.7 top-1 over the baselines at equal MACs (ImageNet, RepVGG-B1).", "",
                  *_table(["model", "target", "PaS", "uniform", "BN-gamma", "L1", "best baseline", "PaS − best"],
                          detail, "lrrrrrlr"), "",
                  f"Measured: PaS has the best mean top-1 at {wins} of {len(targets)} targets; at {clear} of them "
                  f"its mean minus one std is above the best baseline's mean plus one std. Against each "
                  f"baseline: " + "; ".join(_against(by_model, targets, b) for b in BASELINES
                                            if any(b in by_model[m] for m in targets)) + ".",
                  f"**Verdict: {'holds' if targets and wins == len(targets) else 'holds in part' if wins else 'does not hold'}"
                  f"** at this scale.", ""]
    # 1b. PaS vs the smaller family members trained from scratch at similar MACs
    scratch = [r for r in acc if r["method"] == "scratch"]
    pairs = []
    for s in scratch:
        close = [by_model[m]["pas"] for m in targets
                 if abs(by_model[m]["pas"]["macs"] - s["macs"]) <= 0.05 * s["macs"]]
        if close:
            p = min(close, key=lambda r: abs(r["macs"] - s["macs"]))
            pairs.append((p, s))
    if pairs:
        lines += ["## 1b. PaS beats the uniform smaller family member at similar MACs",
                  "Paper: about +1.0 top-1 over uniform RepVGG at similar speed.", "",
                  *_table(["PaS", "MACs", "top-1", "from scratch", "MACs", "top-1", "difference"],
                          [[p["model"], _macs(p["macs"]), _pm(p), s["model"], _macs(s["macs"]), _pm(s),
                            f"{p['top1_mean'] - s['top1_mean']:+.2f}"] for p, s in pairs], "lrrlrrr")]
        better = sum(p["top1_mean"] > s["top1_mean"] for p, s in pairs)
        lines += ["", f"**Verdict: {'holds' if better == len(pairs) else 'holds in part' if better else 'does not hold'}"
                      f"** ({better} of {len(pairs)} pairs).", ""]
    # 2. convergence
    if conv:
        latest = max(c["settled_epoch"] for c in conv)
        lines += ["## 2. The gates settle within the search epochs",
                  f"Paper: kept counts settle well within the 10 search epochs. Measured over {len(conv)} searches "
                  f"of {search_epochs} epochs: the kept channels per layer stay within 1% of their final counts "
                  f"from search epoch {statistics.fmean(c['settled_epoch'] for c in conv):.2f} on average "
                  f"(latest {latest:.2f}); they stop changing at all from epoch "
                  f"{statistics.fmean(c['unchanged_from_epoch'] for c in conv):.2f} on average "
                  f"(latest {max(c['unchanged_from_epoch'] for c in conv):.2f}).", "",
                  *_table(["model", "seed", "within 1% from epoch", "unchanged from epoch", "kept / full channels"],
                          [[c["model"], str(c["seed"]), f"{c['settled_epoch']:.2f}", f"{c['unchanged_from_epoch']:.2f}",
                            f"{c['final_kept']} / {c['full']}"] for c in conv], "lrrrr")]
        lines += ["", f"**Verdict: {'holds' if latest <= search_epochs - 1 else 'does not hold'}** (settled before "
                      f"the last search epoch in {sum(c['settled_epoch'] <= search_epochs - 1 for c in conv)} of "
                      f"{len(conv)} searches).", ""]
    # 3. width profile
    pas_runs = [r for r in runs if r["method"] == "pas"]
    if pas_runs:
        harder = sum(early_pruned_harder(masks[r["masks"]]) for r in pas_runs)
        lines += ["## 3. Early high-resolution layers are pruned harder",
                  "Paper: the high-resolution early stages keep 12-26% of their channels, stage 3 keeps "
                  "43-65% (RepVGG-B1).", "",
                  *_table(["model", "method", "keep fraction per feature-map side (mean over seeds)"],
                          _profile_cells(profile), "lll"),
                  "", f"Measured: in {harder} of {len(pas_runs)} PaS searches the highest-resolution layers keep a "
                      f"smaller fraction than all lower-resolution layers together.",
                  f"**Verdict: {'holds' if harder == len(pas_runs) else 'holds in part' if harder else 'does not hold'}**.",
                  ""]
    return "\n".join(lines)


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
    out_dir = Path(out_dir)
    written = {
        "accuracy.csv": csv_text(pd.DataFrame(acc, columns=ACCURACY_COLUMNS)),
        "accuracy.md": accuracy_markdown(acc),
        "accuracy.tex": accuracy_latex(acc),
        "convergence.csv": csv_text(pd.DataFrame(conv, columns=CONVERGENCE_COLUMNS)),
        "width_profile.csv": csv_text(pd.DataFrame(profile, columns=PROFILE_COLUMNS)),
        "claims.md": claims_markdown(acc, conv, profile, runs, masks, search_epochs),
    }
    paths = []
    for name, text in written.items():
        atomic_write_text(out_dir / name, text)
        paths.append(out_dir / name)
    return paths + save_figure(plot_accuracy(acc), out_dir, "accuracy")


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
    p.add_argument("--out-dir", required=True, help="writes accuracy.{csv,md,tex,png,pdf}, convergence.csv, "
                                                    "width_profile.csv and claims.md here")
    p.set_defaults(func=main)
