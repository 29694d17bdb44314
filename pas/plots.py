"""Figures of a finished run, from the results table and the search histories (PNG + PDF each).

    widths          kept channels per layer: every PaS variant against its full backbone
    accuracy_latency top-1 against measured latency (batch 1 and the largest batch), Pareto front marked
    accuracy_macs   top-1 against MACs, Pareto front marked
    gates           kept channels per layer (fraction of the full width) against search progress
    search_macs     MACs of the gated network during the search, with each variant's target
"""
from __future__ import annotations

import json
from pathlib import Path

from pas.errors import PasError
from pas.io import atomic_path
from pas.tables import as_records, read_table

FIGURES = ("widths", "accuracy_latency", "accuracy_macs", "gates", "search_macs")
FORMATS = ("png", "pdf")
MARKERS = {"pas": "*", "uniform": "o", "bn_gamma": "s", "l1": "^", "full": "D", "scratch": "P"}


def _pyplot():
    """matplotlib on the Agg backend, imported only when drawing (the CLI starts faster)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher accuracy (y)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


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


def plot_widths(rows: list[dict], histories: dict[str, dict]):
    pas = [r for r in rows if r["method"] == "pas" and r["model"] in histories]
    backbones = list(dict.fromkeys(r["backbone"] for r in pas))
    fig, axes = grid(max(1, len(backbones)), width=6)
    for ax, backbone in zip(axes, backbones):
        mine = [r for r in pas if r["backbone"] == backbone]
        full = histories[mine[0]["model"]]["full_widths"]
        x = list(range(len(full)))
        ax.bar(x, full, color="0.85", label=f"{backbone} (full)")
        for r in mine:
            ax.plot(x, r["widths"], marker="o", label=f"{r['model']} ({_m(r['macs'])} MACs)")
        ax.set(title=backbone, xlabel="layer (gated block)", ylabel="channels kept", xticks=x)
        ax.legend(fontsize=7)
    fig.suptitle("Searched width per layer")
    return fig


def _m(macs) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.2f}M"


def _scatter(ax, rows: list[dict], xkey: str, xlabel: str):
    usable = [r for r in rows if r.get(xkey) is not None and r.get("top1") is not None]
    points = [(r[xkey], r["top1"]) for r in usable]
    backbones = list(dict.fromkeys(r["backbone"] for r in usable))
    colors = {b: f"C{i}" for i, b in enumerate(backbones)}
    for r in usable:
        ax.scatter(r[xkey], r["top1"], marker=MARKERS.get(r["method"], "x"), color=colors[r["backbone"]],
                   s=90 if r["method"] == "pas" else 40, zorder=3)
        ax.annotate(r["model"], (r[xkey], r["top1"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    if front:
        xs, ys = zip(*(points[i] for i in front))
        ax.step(xs, ys, where="post", color="k", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.scatter(xs, ys, facecolors="none", edgecolors="k", s=160, lw=1, zorder=4)
    for method, marker in MARKERS.items():
        if any(r["method"] == method for r in usable):
            ax.scatter([], [], marker=marker, color="0.3", label=method)
    for b in backbones:
        ax.scatter([], [], marker="s", color=colors[b], label=b)
    ax.set(xlabel=xlabel, ylabel="top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy_latency(rows: list[dict]):
    batches = sorted({int(k.rsplit("_b", 1)[1]) for r in rows for k in r if k.startswith("latency_ms_b")})
    if not batches:
        raise PasError("the table has no latency columns")
    shown = sorted({batches[0], batches[-1]})
    device = " and ".join(sorted({r["latency_device"] for r in rows}))
    fig, axes = grid(len(shown), width=6, height=4.5)
    for ax, b in zip(axes, shown):
        _scatter(ax, rows, f"latency_ms_b{b}", f"latency (ms, batch {b}, {device})")
        ax.set_title(f"top-1 vs latency, batch {b}")
    return fig


def plot_accuracy_macs(rows: list[dict]):
    fig, axes = grid(1, width=6, height=4.5)
    _scatter(axes[0], rows, "macs", "MACs")
    axes[0].set_xscale("log")
    axes[0].set_title("top-1 vs MACs")
    return fig


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
        ax.plot(x, [r["macs"] / 1e6 for r in h["records"]], color=f"C{i}", label=name)
        ax.axhline(h["target_macs"] / 1e6, color=f"C{i}", ls="--", lw=0.8)
    ax.set(xlabel="search epoch", ylabel="MACs (M)", title="MACs during the search (dashed: target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def make_plots(table: str | Path, histories: dict[str, str | Path], out_dir: str | Path,
               seed: int | None = None) -> list[Path]:
    """Every figure; `seed` keeps the table rows of that seed only (the histories are one seed's)."""
    rows = as_records(read_table(table))
    if seed is not None:
        rows = [r for r in rows if r.get("seed") in (None, seed)]
        if not rows:
            raise PasError(f"--seed {seed}: the table {str(table)!r} has no rows of that seed")
    loaded = {}
    for name, path in histories.items():
        try:
            loaded[name] = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PasError(f"search history {str(path)!r} does not exist") from None
    out_dir = Path(out_dir)
    figures = {"widths": plot_widths(rows, loaded), "accuracy_latency": plot_accuracy_latency(rows),
               "accuracy_macs": plot_accuracy_macs(rows), "gates": plot_gates(loaded),
               "search_macs": plot_search_macs(loaded)}
    return [p for name, fig in figures.items() for p in save_figure(fig, out_dir, name)]


def main(args) -> int:
    histories = {}
    for text in args.history:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise PasError(f"--history {text!r} is not NAME=PATH")
        histories[name] = path
    for path in make_plots(args.table, histories, args.out_dir, seed=args.seed):
        print(path)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("plots", help="figures (PNG + PDF) from the results table and the search histories")
    p.add_argument("--table", required=True, help="the CSV written by pas tables")
    p.add_argument("--history", action="append", default=[], metavar="NAME=PATH",
                   help="a PaS variant's search history JSON (repeat per variant)")
    p.add_argument("--seed", type=int, help="plot only the table rows of this seed (default: every row)")
    p.add_argument("--out-dir", required=True, help=f"writes {', '.join(FIGURES)} as PNG and PDF here")
    p.set_defaults(func=main)
