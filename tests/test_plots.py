"""pas.plots: the outlier fences and y-range, the placement of layers by feature-map side, the points
over the seeds, and the figures drawn from them (axis labels, limits, legend entries, bar heights),
on inputs small enough to compute by hand."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from pas.errors import PasError
from pas.plots import (largest_batch, make_plots, outlier_fences, over_seeds, plot_accuracy_latency, plot_widths,
                       scratch_for, side_positions, y_limits)


def test_outliers_are_beyond_tukeys_far_out_fences():
    # sorted 30, 90, 91, 92, 93: q1 = 90, q3 = 92, IQR 2: fences 90 - 6 and 92 + 6
    assert outlier_fences([93.0, 30.0, 91.0, 90.0, 92.0]) == (84.0, 98.0)
    # a tight cluster: the IQR 0 is floored at 2 points, so 90 -+ 6
    assert outlier_fences([90.0, 90.0, 90.0, 90.0, 80.0]) == (84.0, 96.0)
    # the evidence run's RepVGG panel (means): q1 93.675, q3 94.325, IQR 0.65 floored at 2; the
    # baselines' PaS-A means (90.7-91.5) stay on the axis (with a floor of 0.5 the lower fence was 91.725)
    panel = [93.3, 94.0, 94.3, 90.7, 94.1, 94.4, 91.5, 94.0, 94.1, 90.9, 93.8, 94.3, 94.8, 93.9, 94.8, 94.7]
    assert outlier_fences(panel) == (pytest.approx(87.675), pytest.approx(100.325))
    assert outlier_fences([30.0, 90.0, 91.0]) == (-math.inf, math.inf)  # too few for quartiles


def test_y_range_is_the_inliers_with_their_error_bars_padded():
    # 30 is out; the others span 90 - 1 to 93: 89..93, padded by 8% of 4 = 0.32
    low, high = y_limits([30.0, 90.0, 91.0, 92.0, 93.0], [0.0, 1.0, 0.0, 0.0, float("nan")])
    assert (low, high) == (pytest.approx(88.68), pytest.approx(93.32))
    assert y_limits([90.0], [float("nan")]) == (89.75, 90.25)  # at least a quarter point each side


def test_layers_line_up_by_feature_map_side():
    assert side_positions([14, 14, 7, 4, 4, 4]) == pytest.approx([0.25, 0.75, 1.5, 2 + 1 / 6, 2.5, 2 + 5 / 6])


def test_scratch_member_stands_for_the_targets_within_one_percent_of_its_macs():
    assert scratch_for(1e6, {"a0": 1.005e6, "a1": 1.02e6, "a2": 0.991e6}) == ["a0", "a2"]
    assert scratch_for(None, {"a0": 1e6}) == [] and scratch_for(float("nan"), {"a0": 1e6}) == []


def row(model, method, top1, seed, macs=1e6, backbone="repvgg_b0_mini", **extra):
    return {"model": model, "method": method, "seed": seed, "backbone": backbone, "target_macs": macs, "macs": macs,
            "top1": top1, "top5": 100.0, "latency_device": "cpu", **extra}


def test_points_are_means_over_the_seeds_with_the_baseline_prefix_dropped():
    rows = [row("PaS-A", "pas", 90.0, 0, latency_ms_b64=2.0), row("PaS-A", "pas", 92.0, 1, latency_ms_b64=4.0),
            row("l1@PaS-A", "l1", 80.0, 0, latency_ms_b64=1.0), row("l1@PaS-A", "l1", 70.0, 1, latency_ms_b64=None)]
    points = over_seeds(rows, "latency_ms_b64")
    assert points[["model", "method", "x", "y"]].values.tolist() == [["PaS-A", "pas", 3.0, 91.0],
                                                                     ["PaS-A", "l1", 1.0, 80.0]]
    assert points["y_std"].iloc[0] == pytest.approx(2 ** 0.5) and pd.isna(points["y_std"].iloc[1])


def test_latency_is_pytorchs_at_the_largest_batch():
    rows = [row("PaS-A", "pas", 90.0, 0, latency_ms_b1=0.5, latency_ms_b64=2.0, ort_latency_ms_b128=1.0)]
    assert largest_batch(rows) == 64
    with pytest.raises(PasError, match="no latency_ms_bN column with a value"):
        largest_batch([row("PaS-A", "pas", 90.0, 0, ort_latency_ms_b1=1.0)])


def accuracy_rows():
    """Three targets, PaS and L1 (one L1 point far below), a full backbone and a scratch member; 2 seeds."""
    rows = []
    for seed, shift in enumerate((0.0, 1.0)):
        for i, (target, latency) in enumerate((("PaS-A", 1.0), ("PaS-B", 2.0), ("PaS-C", 3.0))):
            rows.append(row(target, "pas", 90.0 + i + shift, seed, latency_ms_b1=latency / 10,
                            latency_ms_b64=latency))
            rows.append(row(f"l1@{target}", "l1", (30.0 if i == 0 else 89.0 + i) + shift, seed,
                            latency_ms_b1=latency / 10, latency_ms_b64=latency))
        rows.append(row("repvgg_b0_mini", "full", 91.0 + shift, seed, latency_ms_b64=4.0))
        rows.append(row("repvgg_a0_mini", "scratch", 92.0 + shift, seed, macs=5e5, backbone="repvgg_a0_mini",
                        latency_ms_b64=1.0))
    return rows


def test_accuracy_figure_keeps_the_outlier_at_the_edge_and_names_it_in_the_legend():
    fig = plot_accuracy_latency(accuracy_rows())
    ax = fig.axes[0]
    assert ax.get_xlabel() == "PyTorch latency at batch 64 (ms, cpu)"
    assert ax.get_title() == "repvgg_b0_mini: top-1 over 2 seeds (mean ± std)"
    # the means: PaS 90.5 91.5 92.5, L1 30.5 90.5 91.5, full 91.5, scratch 92.5 (std 0.707 each);
    # 30.5 is out, the rest spans 90.5 - 0.707 .. 92.5 + 0.707, padded by 8%
    low, high = 90.5 - 0.5 ** 0.5, 92.5 + 0.5 ** 0.5
    pad = 0.08 * (high - low)
    assert ax.get_ylim() == (pytest.approx(low - pad), pytest.approx(high + pad))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["pas", "l1", "l1, PaS-A: 30.5 (below the axis)", "full repvgg_b0_mini",
                      "scratch repvgg_a0_mini"]


def test_a_latency_budget_is_drawn_at_its_predicted_latency_where_the_table_has_the_plotted_batch():
    """PaS-B searched to 2.2 ms at batch 64 (measured 2.0 ms): a hollow marker at (2.2, its mean top-1)
    joined to the measured point; a table of batch 1 is not drawn against batch-64 latency."""
    rows = accuracy_rows()
    for r in rows:
        if r["model"] == "PaS-B":
            r.update(predicted_latency_ms=2.2, latency_table_batch=64)
        if r["model"] == "PaS-C":
            r.update(predicted_latency_ms=0.3, latency_table_batch=1)
    ax = plot_accuracy_latency(rows).axes[0]
    hollow = [c for c in ax.collections if c.get_label() == "predicted by the latency table"]
    assert len(hollow) == 1 and hollow[0].get_offsets().tolist() == [[2.2, 91.5]]
    assert ([2.0, 2.2], [91.5, 91.5]) in [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines]
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "predicted by the latency table"


def test_width_panel_shows_pas_on_its_backbone_and_the_scratch_member_by_side():
    rows = [row("PaS-A", "pas", 90.0, 0, macs=516000, widths=[4, 4, 4, 8, 8, 16, 16, 16, 16, 100]),
            row("repvgg_a0_mini", "scratch", 92.0, 0, macs=516544, widths=[6, 6, 12, 12, 24, 24, 24, 160]),
            row("repvgg_a1_mini", "scratch", 93.0, 0, macs=850912, widths=[8, 8, 16, 16, 32, 32, 32, 160])]
    rows[0]["target_macs"] = 516544
    history = {"full_widths": [8, 8, 8, 16, 16, 32, 32, 32, 32, 160], "layer_sizes": [14, 14, 14, 7, 7, 4, 4, 4, 4, 2]}
    ax = plot_widths(rows, {"PaS-A": history}).axes[0]
    full, pas = ax.containers
    assert [b.get_height() for b in full] == history["full_widths"]
    assert [b.get_height() for b in pas] == rows[0]["widths"]
    assert [b.get_x() + b.get_width() / 2 for b in pas] == pytest.approx(
        [1 / 6, 0.5, 5 / 6, 1.25, 1.75, 2.125, 2.375, 2.625, 2.875, 3.5])
    (line,) = ax.get_lines()[:1]
    # repvgg_a0_mini: 2 layers at the stem's side, 2 at the next, 3, then 1
    assert line.get_xdata().tolist() == pytest.approx([0.25, 0.75, 1.25, 1.75, 2 + 1 / 6, 2.5, 2 + 5 / 6, 3.5])
    assert line.get_ydata().tolist() == [6, 6, 12, 12, 24, 24, 24, 160]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["14px", "7px", "4px", "2px"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "repvgg_b0_mini (full)", "PaS-A (0.52M MACs)", "repvgg_a0_mini from scratch (0.52M MACs)"]


def test_make_plots_writes_every_figure_from_the_table_and_the_histories(tmp_path):
    rows = accuracy_rows()
    for r in rows:
        r["widths"] = "1 2"
    pd.DataFrame(rows).to_csv(tmp_path / "main.csv", index=False)
    history = {"full_widths": [2, 4], "layer_sizes": [4, 2], "target_macs": 1e6,
               "records": [{"epoch": 1, "step": s, "macs": 1e6, "kept": [2, 3]} for s in range(3)]}
    (tmp_path / "h.json").write_text(json.dumps(history))
    paths = make_plots(tmp_path / "main.csv", {"PaS-A": tmp_path / "h.json"}, tmp_path / "out", seed=1)
    names = ("widths", "accuracy_latency", "accuracy_macs", "gates", "search_macs")
    assert paths == [tmp_path / "out" / f"{n}.{fmt}" for n in names for fmt in ("png", "pdf")]
    assert all(p.read_bytes()[:4] in (b"\x89PNG", b"%PDF") for p in paths)
    with pytest.raises(PasError, match="--seed 7: the table .* has no rows of that seed"):
        make_plots(tmp_path / "main.csv", {}, tmp_path / "out", seed=7)


def test_a_search_to_a_latency_budget_has_no_macs_target_line():
    from pas.plots import plot_search_macs
    records = [{"epoch": 1, "step": 0, "record": 0, "macs": 2e6, "kept": [8]},
               {"epoch": 1, "step": 5, "record": 1, "macs": 1e6, "kept": [4]}]
    histories = {"PaS-A": {"target_macs": 1.5e6, "records": records, "full_widths": [8]},
                 "PaS-A-latency": {"target_macs": None, "records": records, "full_widths": [8]}}
    ax = plot_search_macs(histories).axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in dashed] == [[1.5, 1.5]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["PaS-A", "PaS-A-latency (latency budget: no MACs target)"]
