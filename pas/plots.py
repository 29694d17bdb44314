"""Figures of a finished run, from the results table and the search histories (PNG + PDF each).

    widths          channels per layer of each PaS variant against its full backbone and the scratch
                    member at its MACs, layers placed by feature-map side
    accuracy_latency top-1 (mean ± std over the seeds) against PyTorch latency at the largest batch:
                    one panel per backbone, one line per method across the targets, the full
                    backbone and the scratch members as reference markers; a network searched to a
                    latency budget at that batch also at its predicted latency (hollow marker)
    accuracy_macs   the same against MACs
    gates           kept channels per layer (fraction of the full width) against search progress
    search_macs     MACs of the gated network during the search, with each variant's target
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pas.config import SCRATCH_METHODS
from pas.errors import PasError
from pas.io import atomic_path
from pas.tables import as_records, read_table

FIGURES = ("widths", "accuracy_latency", "accuracy_macs", "gates", "search_macs")
FORMATS = ("png", "pdf")
MARKERS = {"pas": "*", "uniform": "o", "bn_gamma": "s", "l1": "^", "full": "D", "scratch": "P", "scratch_long": "X"}


def _pyplot():
    """matplotlib on the Agg backend, imported only when drawing (the CLI starts faster)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def search_progress(history: dict) -> list[float]:
    """Each record's position in epochs (epoch - 1 + step / steps of that epoch)."""
    records = history["records"]
    steps = {}
    for r in records:
        steps[r["epoch"]] = max(steps.get(r["epoch"], 0), r["step"])
    per_epoch = max(steps.values(), default=0) + 1
    return [r["epoch"] - 1 + r["step"] / per_epoch for r in records]


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """out_dir/name.png and .pdf, each written atomically; the figure is closed."""
    fig.tight_layout()
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths


def grid(n: int, width: float = 4.5, height: float = 3.2):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = _pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


# -- accuracy against cost -------------------------------------------------------------------------

# A scratch member stands for the variants whose target is within 1% of its MACs: the rule the workflow
# uses for a scratch member's `target` tag.
SCRATCH_MATCH = 0.01
# Tukey's "far out" fences, with the spread floored at 2 points: where every method ties within tenths
# at the larger targets, a floor of 0.5 made a whole row of real means 3 points lower (the baselines
# at the smallest target) "outliers"; with 2 only a point more than 6 points beyond the quartiles (a
# collapsed search, a diverged run) goes to the edge.
FENCE_K = 3.0
FENCE_MIN_IQR = 2.0  # top-1 points
METHOD_COLORS = {"pas": "C0", "uniform": "C1", "bn_gamma": "C2", "l1": "C3"}
DODGE = 0.01  # of a panel's x-range, between neighbouring methods
REFERENCE_COLORS = ("0.15", "0.45", "0.65", "0.3", "0.55")


def family(name: str) -> str:
    """'repvgg' of 'repvgg_a0_mini': the members a backbone is compared with share this prefix."""
    return name.split("_")[0]


def scratch_for(target_macs, members: dict[str, float]) -> list[str]:
    """The scratch members (name: MACs) at a target: |target / MACs - 1| <= SCRATCH_MATCH."""
    if target_macs is None or target_macs != target_macs:  # None or NaN: a reference row has no target
        return []
    return [name for name, macs in members.items() if abs(target_macs / macs - 1) <= SCRATCH_MATCH]


def over_seeds(rows: list[dict], xkey: str) -> pd.DataFrame:
    """One point per (model, method) over the seeds: columns model (a baseline's `method@` prefix
    dropped, so it names the target), method, backbone, x (mean of `xkey`), y (mean top-1), y_std
    (sample std, NaN for one seed); rows without `xkey` or top-1 left out; in the rows' order."""
    frame = pd.DataFrame(rows)
    if xkey not in frame or frame.empty:
        return pd.DataFrame(columns=["model", "method", "backbone", "x", "y", "y_std"])
    frame = frame.dropna(subset=[xkey, "top1"])
    frame = frame.assign(model=frame["model"].str.split("@").str[-1])
    return frame.groupby(["model", "method"], sort=False).agg(
        backbone=("backbone", "first"), x=(xkey, "mean"), y=("top1", "mean"), y_std=("top1", "std")).reset_index()


def outlier_fences(values, k: float = FENCE_K, min_iqr: float = FENCE_MIN_IQR) -> tuple[float, float]:
    """(q1 - k·IQR, q3 + k·IQR) with IQR = max(q3 - q1, min_iqr), quartiles by linear interpolation;
    (-inf, inf) for fewer than 4 values (too few for quartiles)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 4:
        return -np.inf, np.inf
    q1, q3 = np.percentile(values, [25, 75])
    iqr = max(q3 - q1, min_iqr)
    return q1 - k * iqr, q3 + k * iqr


def y_limits(y, y_std) -> tuple[float, float]:
    """The y-range of the points inside outlier_fences(y), error bars included: [min(y - std),
    max(y + std)] padded by 8% of that span on each side (at least 0.25 points)."""
    y = np.asarray(y, dtype=float)
    std = np.nan_to_num(np.asarray(y_std, dtype=float))
    lo, hi = outlier_fences(y)
    inside = (y >= lo) & (y <= hi)
    low, high = float(np.min(y[inside] - std[inside])), float(np.max(y[inside] + std[inside]))
    pad = max(0.08 * (high - low), 0.25)
    return low - pad, high + pad


def _series(ax, pts: pd.DataFrame, limits: tuple[float, float], *, color, marker, label, line: bool, size=6):
    """Points with error bars inside `limits`; a point outside is drawn on the nearest edge as a
    triangle pointing off the axis, and named with its value in the legend. Returns the legend's
    (handle, label) pairs in drawing order."""
    lo, hi = limits
    inside = pts[(pts["y"] >= lo) & (pts["y"] <= hi)]
    if line and len(pts) > 1:  # the line runs to the edge where a point is off the axis
        ax.plot(pts["x"], pts["y"].clip(lo, hi), color=color, lw=1.2, zorder=2)
    handle = ax.errorbar(inside["x"], inside["y"], yerr=inside["y_std"].fillna(0.0), fmt=marker, color=color,
                         ms=size, capsize=3, zorder=3)
    entries = [(handle, label)]
    for _, p in pts[(pts["y"] < lo) | (pts["y"] > hi)].iterrows():
        below = p["y"] < lo
        edge = ax.scatter([p["x"]], [lo if below else hi], marker="v" if below else "^", color=color, s=70,
                          clip_on=False, zorder=4)
        entries.append((edge, f"{label}, {p['model']}: {p['y']:.1f} ({'below' if below else 'above'} the axis)"))
    return entries


def _references(points: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """The full backbone and the scratch members of its family."""
    full = (points["method"] == "full") & (points["model"] == backbone)
    scratch = points["method"].isin(SCRATCH_METHODS) & (points["model"].map(family) == family(backbone))
    return points[full | scratch]


def accuracy_panel(ax, points: pd.DataFrame, backbone: str, predicted: pd.DataFrame | None = None):
    """One backbone: a line per method across its targets, the reference networks as markers, and
    the predicted latency of the networks in `predicted` (`predicted_points`)."""
    methods = points[(points["backbone"] == backbone) & points["method"].isin(METHOD_COLORS)]
    refs = _references(points, backbone)
    shown = pd.concat([methods, refs])
    limits = y_limits(shown["y"], shown["y_std"])
    entries = []
    # the methods share each target's MACs: shifted apart by 1% of the x-range each, so error bars do
    # not hide one another
    span = float(shown["x"].max() - shown["x"].min()) or 1.0
    for i, (method, color) in enumerate(METHOD_COLORS.items()):
        mine = methods[methods["method"] == method].sort_values("x")
        mine = mine.assign(x=mine["x"] + DODGE * span * (i - (len(METHOD_COLORS) - 1) / 2))
        if not mine.empty:
            entries += _series(ax, mine, limits, color=color, marker=MARKERS[method], label=method, line=True,
                               size=10 if method == "pas" else 6)
    for i, (_, r) in enumerate(refs.iterrows()):
        entries += _series(ax, refs.loc[[r.name]], limits, color=REFERENCE_COLORS[i % len(REFERENCE_COLORS)],
                           marker=MARKERS[r["method"]], label=f"{r['method']} {r['model']}", line=False, size=8)
    ax.set_ylim(*limits)
    ax.grid(alpha=0.3)
    if predicted is not None:
        entries += predicted_points(ax, points, predicted, backbone)
    # outside the axes, so that no entry covers a point
    ax.legend(*zip(*entries), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def predicted_points(ax, measured: pd.DataFrame, predicted: pd.DataFrame, backbone: str) -> list:
    """Networks searched to a latency budget: a hollow marker at the latency the table predicted,
    joined to the measured point by a dotted line (same top-1). Returns the legend's entry."""
    mine = predicted[predicted["backbone"] == backbone]
    if mine.empty:
        return []
    at = measured.set_index(["model", "method"])["x"]
    for _, p in mine.iterrows():
        if (p["model"], p["method"]) in at.index:
            ax.plot([at[(p["model"], p["method"])], p["x"]], [p["y"], p["y"]], ls=":", color="0.4", lw=1, zorder=1)
    label = "predicted by the latency table"
    return [(ax.scatter(mine["x"], mine["y"], facecolors="none", edgecolors="0.2", s=60, zorder=4, label=label),
             label)]


def plot_accuracy_vs(rows: list[dict], xkey: str, xlabel: str, scale: float = 1.0, predicted_key: str | None = None):
    """Top-1 (mean ± std over the seeds) against `xkey` / scale, one panel per searched backbone;
    with `predicted_key`, the rows that have it get a predicted point too (`predicted_points`)."""
    points = over_seeds(rows, xkey)
    points["x"] = points["x"] / scale
    backbones = list(dict.fromkeys(points.loc[points["method"].isin(METHOD_COLORS), "backbone"]))
    seeds = len({r.get("seed") for r in rows})
    fig, axes = grid(max(1, len(backbones)), width=6.5, height=4.2)
    predicted = over_seeds(rows, predicted_key) if predicted_key else None
    if predicted is not None:
        predicted["x"] = predicted["x"] / scale
    for ax, backbone in zip(axes, backbones):
        accuracy_panel(ax, points, backbone, predicted)
        ax.set(title=f"{backbone}: top-1 over {seeds} seed{'s' * (seeds > 1)} (mean ± std)", xlabel=xlabel,
               ylabel="top-1 (%)")
    return fig


def largest_batch(rows: list[dict]) -> int:
    """The largest batch with a PyTorch latency column (`latency_ms_bN`; ONNX Runtime's are ort_...)."""
    batches = {int(k.rsplit("_b", 1)[1]) for r in rows for k, v in r.items()
               if k.startswith("latency_ms_b") and v is not None}
    if not batches:
        raise PasError("the table has no latency_ms_bN column with a value; expected PyTorch latencies")
    return max(batches)


def plot_accuracy_latency(rows: list[dict]):
    b = largest_batch(rows)
    device = " and ".join(sorted({r["latency_device"] for r in rows if r.get("latency_device")}))
    # a latency budget's predicted latency, where its table was measured at this batch
    rows = [{**r, "predicted_at_b": r.get("predicted_latency_ms") if r.get("latency_table_batch") == b else None}
            for r in rows]
    any_predicted = any(r["predicted_at_b"] is not None for r in rows)
    return plot_accuracy_vs(rows, f"latency_ms_b{b}", f"PyTorch latency at batch {b} (ms, {device})",
                            predicted_key="predicted_at_b" if any_predicted else None)


def plot_accuracy_macs(rows: list[dict]):
    return plot_accuracy_vs(rows, "macs", "MACs (M)", scale=1e6)


# -- widths ----------------------------------------------------------------------------------------

def side_positions(sizes: list[int]) -> list[float]:
    """x of every layer: the layers at the k-th feature-map side (in order of appearance) share
    [k, k + 1), the i-th of n at k + (i + 0.5) / n; networks of different depth line up by side."""
    sides = list(dict.fromkeys(sizes))
    counts = {s: sizes.count(s) for s in sides}
    seen = {s: 0 for s in sides}
    x = []
    for s in sizes:
        x.append(sides.index(s) + (seen[s] + 0.5) / counts[s])
        seen[s] += 1
    return x


def member_sizes(name: str) -> list[int]:
    """The feature-map side of every searchable layer of a registered network at its default input
    (only the grouping by side is used, which the input size does not change)."""
    from pas.models import arch_for  # imports torch: only when a scratch member is drawn
    return arch_for(name).searchable_sizes()


def widths_panel(ax, row: dict, history: dict, members: list[dict]):
    """A PaS variant's widths (bars) on its full backbone's (grey bars), with the scratch members at
    its MACs (lines), every network's layers placed by feature-map side."""
    sizes = history["layer_sizes"]
    x = side_positions(sizes)
    bar = 0.8 / max(sizes.count(s) for s in sizes)
    entries = [(ax.bar(x, history["full_widths"], width=bar, color="0.85"), f"{row['backbone']} (full)"),
               (ax.bar(x, row["widths"], width=0.6 * bar, color="C0"), f"{row['model']} ({_m(row['macs'])} MACs)")]
    for i, m in enumerate(members):
        member = member_sizes(m["model"])
        if len(member) != len(m["widths"]):
            raise PasError(f"scratch member {m['model']!r}: {len(m['widths'])} widths in the table, expected "
                           f"{len(member)} (its searchable layers)")
        (line,) = ax.plot(side_positions(member), m["widths"], marker="P", color=f"C{i + 1}", lw=1.2)
        entries.append((line, f"{m['model']} from scratch ({_m(m['macs'])} MACs)"))
    sides = list(dict.fromkeys(sizes))
    ax.set_xticks([k + 0.5 for k in range(len(sides))], [f"{s}px" for s in sides])
    for k in range(1, len(sides)):
        ax.axvline(k, color="0.6", lw=0.6, ls=":")
    # log scale: the head layer (hundreds of channels) would flatten the early layers (a few) on a linear one
    ax.set_yscale("log", base=2)
    ax.set(title=row["model"], xlabel="layers by feature-map side", ylabel="channels (log scale)",
           xlim=(0, len(sides)))
    ax.legend(*zip(*entries), fontsize=7)


def plot_widths(rows: list[dict], histories: dict[str, dict]):
    """One panel per PaS variant with a search history (the rows are that search's seed)."""
    pas = list({r["model"]: r for r in rows if r["method"] == "pas" and r["model"] in histories}.values())
    scratch = [r for r in rows if r["method"] == "scratch"]
    macs = {r["model"]: r["macs"] for r in scratch}
    fig, axes = grid(max(1, len(pas)), width=5.5)
    for ax, r in zip(axes, pas):
        names = scratch_for(r["target_macs"], macs)
        widths_panel(ax, r, histories[r["model"]], [s for s in scratch if s["model"] in names])
    fig.suptitle("Width per layer: PaS against the full backbone and the member trained from scratch at its MACs")
    return fig


def _m(macs) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.2f}M"


def plot_gates(histories: dict[str, dict]):
    fig, axes = grid(max(1, len(histories)))
    for ax, (name, h) in zip(axes, histories.items()):
        x = search_progress(h)
        full = h["full_widths"]
        for layer, width in enumerate(full):
            ax.plot(x, [r["kept"][layer] / width for r in h["records"]], lw=1, label=f"{layer}")
        ax.set(title=name, xlabel="search epoch", ylabel="kept / full width", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
    if histories:
        axes[0].legend(title="layer", fontsize=6, ncol=2)
    fig.suptitle("Gate convergence: channels kept per layer during the search")
    return fig


def plot_search_macs(histories: dict[str, dict]):
    fig, axes = grid(1, width=6, height=4)
    ax = axes[0]
    for i, (name, h) in enumerate(histories.items()):
        x = search_progress(h)
        budget = h.get("target_macs")
        ax.plot(x, [r["macs"] / 1e6 for r in h["records"]], color=f"C{i}",
                label=name if budget is not None else f"{name} (latency budget: no MACs target)")
        if budget is not None:
            ax.axhline(budget / 1e6, color=f"C{i}", ls="--", lw=0.8)
    ax.set(xlabel="search epoch", ylabel="MACs (M)", title="MACs during the search (dashed: target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def make_plots(table: str | Path, histories: dict[str, str | Path], out_dir: str | Path,
               seed: int | None = None) -> list[Path]:
    """Every figure: accuracy against latency and MACs over every seed of the table (mean ± std);
    widths of the table rows of `seed` (the histories are that seed's searches; every row if None)."""
    rows = as_records(read_table(table))
    searched = rows
    if seed is not None:
        searched = [r for r in rows if r.get("seed") in (None, seed)]
        if not searched:
            raise PasError(f"--seed {seed}: the table {str(table)!r} has no rows of that seed")
    loaded = {}
    for name, path in histories.items():
        try:
            loaded[name] = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PasError(f"search history {str(path)!r} does not exist") from None
    out_dir = Path(out_dir)
    figures = {"widths": plot_widths(searched, loaded), "accuracy_latency": plot_accuracy_latency(rows),
               "accuracy_macs": plot_accuracy_macs(rows), "gates": plot_gates(loaded),
               "search_macs": plot_search_macs(loaded)}
    return [p for name, fig in figures.items() for p in save_figure(fig, out_dir, name)]


def main(args) -> int:
    from pas.config import named_values
    histories = named_values(args.history, option="--history", value="PATH")
    for path in make_plots(args.table, histories, args.out_dir, seed=args.seed):
        print(path)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("plots", help="figures (PNG + PDF) from the results table and the search histories")
    p.add_argument("--table", required=True, help="the CSV written by pas tables")
    p.add_argument("--history", action="append", default=[], metavar="NAME=PATH",
                   help="a PaS variant's search history JSON (repeat per variant)")
    p.add_argument("--seed", type=int, help="the seed of the search histories: the width figure shows that "
                                            "seed's rows (default: every row); the accuracy figures show "
                                            "every seed's (mean ± std)")
    p.add_argument("--out-dir", required=True, help=f"writes {', '.join(FIGURES)} as PNG and PDF here")
    p.set_defaults(func=main)


def samples_figure(samples: dict[str, str], out, *, labels=("input", "truth")) -> None:
    """One figure of every model's samples.png (three rows each: the inputs, the model's output, the
    truth; pas evaluate writes them for tasks translation and segmentation): the first's inputs on
    top, one row per model, the first's truth at the bottom, labelled `labels`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from pas.io import atomic_path
    if not samples:
        raise PasError("no models given; expected --model NAME=samples.png at least once")
    grids = {}
    for name, path in samples.items():
        try:
            grids[name] = np.asarray(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as e:
            raise PasError(f"samples {str(path)!r} of {name!r} cannot be read ({e}); expected the samples.png "
                           f"pas evaluate writes for tasks translation and segmentation") from None
    first = next(iter(grids.values()))
    h = first.shape[0] // 3
    if any(g.shape != first.shape for g in grids.values()) or first.shape[0] % 3:
        raise PasError(f"sample grids of shapes {sorted({g.shape for g in grids.values()})}; expected one shape, "
                       f"three rows (inputs, outputs, truth)")
    rows = [(labels[0], first[:h])] + [(n, g[h:2 * h]) for n, g in grids.items()] + [(labels[1], first[2 * h:])]
    fig, axes = plt.subplots(len(rows), 1, figsize=(first.shape[1] / 40, 0.75 * len(rows)), squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], rows):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=str(out).rsplit(".", 1)[-1], dpi=150, bbox_inches="tight")
    plt.close(fig)


def add_samples_subcommand(sub) -> None:
    p = sub.add_parser("samples", help="one figure of every model's samples (translations, predicted masks)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PNG",
                   help="a model's samples.png (pas evaluate, tasks translation and segmentation); repeatable, "
                        "in row order")
    p.add_argument("--labels", nargs=2, default=["input", "truth"], metavar=("INPUT", "TRUTH"),
                   help="labels of the first and last rows")
    p.add_argument("--out", required=True, help="the figure (.png or .pdf)")

    def run(args) -> int:
        from pas.config import named_values
        samples_figure(named_values(args.model, option="--model", value="PNG"), args.out, labels=args.labels)
        return 0
    p.set_defaults(func=run)
