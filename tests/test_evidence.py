"""pas.evidence: the aggregation over seeds, the gate settle point, the width profile and the claims'
verdicts, on inputs small enough to compute by hand; the CLI's errors."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import pas.models
from pas.errors import PasError
from pas.evidence import (accuracy_latex, accuracy_markdown, accuracy_rows, claims, claims_markdown,
                          comparison_markdown, comparison_rows, early_pruned_harder, interval_verdict,
                          keep_by_resolution, overall_verdict, paired_interval, parse_run_spec, profile_rows,
                          settle_point, t_quantile, verdicts_json, welch_interval)


def history(kept_per_record, steps_per_epoch=2):
    records = [{"epoch": i // steps_per_epoch + 1, "step": i % steps_per_epoch, "record": i, "macs": 0, "kept": k}
               for i, k in enumerate(kept_per_record)]
    return {"full_widths": [4, 4], "records": records}


def test_settle_point_is_the_first_record_after_the_last_change():
    # positions in epochs: 0, 0.5, 1, 1.5, 2, 2.5; the counts last change at the 4th record (1.5)
    h = history([[4, 4], [3, 4], [2, 4], [2, 3], [2, 3], [2, 3]])
    assert settle_point(h) == (1.5, 1.5)
    # within 25% of the final 5 channels (1.25): the 3rd record (distance 1) is near enough, the 2nd
    # (distance 2) is not: settled from 1.0 on, unchanged from 1.5 on
    assert settle_point(h, fraction=0.25) == (1.0, 1.5)
    assert settle_point(history([[4, 4]] * 4)) == (0.0, 0.0)
    with pytest.raises(PasError, match="no records"):
        settle_point({"full_widths": [4], "records": []})


def test_keep_fraction_per_resolution_and_the_early_layers_verdict():
    masks = {"widths": [2, 4, 8, 8], "full_widths": [8, 8, 16, 16], "layer_sizes": [14, 14, 7, 4]}
    assert keep_by_resolution(masks) == {14: 6 / 16, 7: 0.5, 4: 0.5}
    assert early_pruned_harder(masks)  # 6/16 at 14px < 16/32 below
    assert not early_pruned_harder({**masks, "widths": [8, 8, 8, 8]})  # 16/16 > 16/32
    with pytest.raises(PasError, match="no layer_sizes"):
        keep_by_resolution({"widths": [1], "full_widths": [2]})


def test_layer_sizes_are_the_resolution_of_every_searchable_layer():
    rep = pas.models.arch_for("repvgg_b0_mini", num_classes=10, in_channels=1, resolution=28)
    # 28 -> 14 (stem) -> 14 -> 7 -> 4 -> 2, blocks per stage (1, 2, 2, 4, 1)
    assert rep.searchable_sizes() == [14, 14, 14, 7, 7, 4, 4, 4, 4, 2] and len(rep.widths) == 10
    mb = pas.models.arch_for("mobilenetv2_100", num_classes=1000, in_channels=3, resolution=224)
    sizes = mb.searchable_sizes()
    assert len(sizes) == len(mb.searchable_widths()) == 16  # every block but the first expands
    # the side at which each expansion writes its channels (the gate's), before the depth-wise stride
    assert sizes[0] == 112 and sizes[-1] == 7 and sizes == sorted(sizes, reverse=True)


def row(model, method, top1, seed, macs=1e6, backbone="b"):
    return {"model": model, "method": method, "seed": seed, "backbone": backbone, "target_macs": macs,
            "macs": macs, "top1": top1, "top5": 100.0}


def test_accuracy_rows_aggregate_each_method_and_target_over_the_seeds():
    rows = [row("PaS-A", "pas", t, s) for s, t in enumerate((90.0, 91.0, 95.0))]
    rows += [row("uniform@PaS-A", "uniform", t, s) for s, t in enumerate((89.0, 89.0, 92.0))]
    rows += [row("b", "full", 96.0, s, macs=2e6) for s in range(3)]
    acc = accuracy_rows(rows)
    assert [(r["model"], r["method"], r["seeds"]) for r in acc] == [("PaS-A", "pas", 3), ("PaS-A", "uniform", 3),
                                                                     ("b", "full", 3)]
    assert acc[0]["top1_mean"] == pytest.approx(92.0)
    assert acc[0]["top1_std"] == pytest.approx(statistics.stdev([90.0, 91.0, 95.0]))
    assert (acc[1]["top1_min"], acc[1]["top1_max"]) == (89.0, 92.0)
    assert acc[2]["top1_std"] == 0.0


def test_width_profile_is_the_mean_and_sample_std_of_the_kept_fraction_over_the_seeds():
    masks = {"s0": {"widths": [2, 4, 8, 8], "full_widths": [8, 8, 16, 16], "layer_sizes": [14, 14, 7, 4]},
             "s1": {"widths": [3, 4, 5, 8], "full_widths": [8, 8, 16, 16], "layer_sizes": [14, 14, 7, 4]},
             "l1": {"widths": [3, 3, 9, 8], "full_widths": [8, 8, 16, 16], "layer_sizes": [14, 14, 7, 4]}}
    runs = [{"model": "PaS-A", "method": "pas", "masks": "s0"}, {"model": "PaS-A", "method": "l1", "masks": "l1"},
            {"model": "PaS-A", "method": "pas", "masks": "s1"}]
    # kept fractions at 14 px: 6/16 and 7/16 (mean 0.40625, std 0.0442); at 7 px: 8/16 and 5/16 (std 0.1326)
    assert profile_rows(runs, masks, {"PaS-A": "b0"}) == [
        {"model": "PaS-A", "backbone": "b0", "method": "pas", "resolution": 14, "seeds": 2, "keep_mean": 0.4062,
         "keep_std": 0.0442},
        {"model": "PaS-A", "backbone": "b0", "method": "pas", "resolution": 7, "seeds": 2, "keep_mean": 0.4062,
         "keep_std": 0.1326},
        {"model": "PaS-A", "backbone": "b0", "method": "pas", "resolution": 4, "seeds": 2, "keep_mean": 0.5,
         "keep_std": 0.0},
        {"model": "PaS-A", "backbone": "b0", "method": "l1", "resolution": 14, "seeds": 1, "keep_mean": 0.375,
         "keep_std": None},
        {"model": "PaS-A", "backbone": "b0", "method": "l1", "resolution": 7, "seeds": 1, "keep_mean": 0.5625,
         "keep_std": None},
        {"model": "PaS-A", "backbone": "b0", "method": "l1", "resolution": 4, "seeds": 1, "keep_mean": 0.5,
         "keep_std": None}]


def table_cells(markdown: str) -> list[list[str]]:
    """The cells of every row of the Markdown tables in `markdown`, stripped."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]


def test_accuracy_table_shows_mean_and_std_as_plus_minus_in_markdown_and_latex():
    rows = [row("PaS_A", "pas", t, s, macs=516544) for s, t in enumerate((87.5, 88.5))]
    rows += [row("b", "full", 90.0, 0, macs=2.5e9)]
    acc = accuracy_rows(rows)
    assert accuracy_latex(acc) == textwrap.dedent(r"""
        \begin{tabular}{llrrrrr}
        \hline
        model & method & target MACs & MACs & seeds & top-1 \% (mean $\pm$ std) & top-1 min-max \\
        \hline
        PaS\_A & pas & 0.517M & 0.517M & 2 & 88.00 $\pm$ 0.71 & 87.50-88.50 \\
        b & full & 2.500G & 2.500G & 1 & 90.00 & 90.00-90.00 \\
        \hline
        \end{tabular}
        """).lstrip()
    cells = table_cells(accuracy_markdown(acc))
    assert cells[0] == ["model", "method", "target MACs", "MACs", "seeds", "top-1 % (mean ± std)", "top-1 min-max"]
    assert cells[2:] == [["PaS_A", "pas", "0.517M", "0.517M", "2", "88.00 ± 0.71", "87.50-88.50"],
                         ["b", "full", "2.500G", "2.500G", "1", "90.00", "90.00-90.00"]]


def test_t_quantiles_are_the_table_values():
    # two-sided 95% quantiles from a printed t table
    assert t_quantile(2) == pytest.approx(4.303, abs=5e-4)
    assert t_quantile(4) == pytest.approx(2.776, abs=5e-4)
    assert t_quantile(10) == pytest.approx(2.228, abs=5e-4)
    with pytest.raises(PasError, match="0 degrees of freedom: expected a positive number"):
        t_quantile(0)


def test_paired_interval_and_verdict_by_hand():
    # differences 1, 2, 3: mean 2, sample std 1, half-width 4.303 * 1 / sqrt(3) = 2.484
    r = paired_interval([1.0, 2.0, 3.0])
    assert (r["diff_mean"], r["diff_std"], r["dof"]) == (2.0, 1.0, 2.0)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(-0.484, abs=1e-3), pytest.approx(4.484, abs=1e-3))
    assert interval_verdict(r["ci_low"], r["ci_high"]) == "within noise"
    # differences 1, 1.5, 2: mean 1.5, std 0.5, half-width 1.242: the interval lies above 0
    r = paired_interval([1.0, 1.5, 2.0])
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(0.258, abs=1e-3), pytest.approx(2.742, abs=1e-3))
    assert interval_verdict(r["ci_low"], r["ci_high"]) == "ahead"
    assert interval_verdict(-2.0, -0.1) == "behind"
    one = paired_interval([0.7])
    assert one["diff_mean"] == 0.7 and one["ci_low"] is None
    assert interval_verdict(one["ci_low"], one["ci_high"]) == "one seed: no interval"
    with pytest.raises(PasError, match="no paired differences"):
        paired_interval([])


def test_a_claim_holds_only_where_the_intervals_say_ahead():
    assert overall_verdict(["ahead", "ahead"]) == "holds"
    assert overall_verdict(["ahead", "behind", "within noise"]) == "holds in part"
    assert overall_verdict(["within noise", "behind"]) == "does not hold"
    assert overall_verdict(["within noise", "within noise"]) == "not shown"
    assert overall_verdict(["one seed: no interval"]) == "untested"


def test_welch_interval_by_hand():
    # equal variances (7) and sizes (3): se^2 = 7/3 + 7/3, dof = 4, t = 2.776
    r = welch_interval([90.0, 91.0, 95.0], [88.0, 89.0, 93.0])
    assert r["diff_mean"] == 2.0 and r["dof"] == pytest.approx(4.0)
    half = 2.776 * (14 / 3) ** 0.5
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(2 - half, abs=2e-3), pytest.approx(2 + half, abs=2e-3))
    # variances 7 (n 3) and 2 (n 2): dof = (7/3 + 1)^2 / ((7/3)^2 / 2 + 1^2 / 1) = 200/67
    assert welch_interval([90.0, 91.0, 95.0], [91.0, 93.0])["dof"] == pytest.approx(200 / 67)
    assert welch_interval([90.0], [91.0, 93.0])["ci_low"] is None


def test_comparisons_pair_pas_and_each_baseline_by_seed():
    # seeds listed out of order on one side: the pairing is by seed, not by position
    rows = [row("PaS-A", "pas", t, s) for s, t in ((2, 95.0), (0, 90.0), (1, 91.0))]
    rows += [row("uniform@PaS-A", "uniform", t, s) for s, t in enumerate((89.0, 89.0, 92.0))]  # 1, 2, 3
    rows += [row("bn_gamma@PaS-A", "bn_gamma", t, s) for s, t in enumerate((93.0, 94.0, 98.0))]  # -3, -3, -3
    # 10, 10, 13; seed 3 has no PaS row to pair with
    rows += [row("l1@PaS-A", "l1", t, s) for s, t in enumerate((80.0, 81.0, 82.0, 50.0))]
    rows += [row("repvgg_a0_mini", "scratch", t, s, macs=1.005e6) for s, t in enumerate((88.0, 89.0, 93.0))]
    rows += [row("repvgg_a1_mini", "scratch", 99.0, 0, macs=1.02e6)]  # 2% away from the target: not compared
    # the stricter row (the member for PaS's total epochs): 2 seeds, 94 and 96
    rows += [row("repvgg_a0_mini-140ep", "scratch_long", t, s, macs=1.005e6) for s, t in enumerate((94.0, 96.0))]
    got = {c["against_model"]: c for c in comparison_rows(rows)}
    assert list(got) == ["uniform@PaS-A", "bn_gamma@PaS-A", "l1@PaS-A", "repvgg_a0_mini", "repvgg_a0_mini-140ep"]
    assert got["uniform@PaS-A"]["diff_mean"] == 2.0 and got["uniform@PaS-A"]["verdict"] == "within noise"
    assert (got["bn_gamma@PaS-A"]["ci_low"], got["bn_gamma@PaS-A"]["ci_high"]) == (-3.0, -3.0)
    assert got["bn_gamma@PaS-A"]["verdict"] == "behind"
    # differences 10, 10, 13: mean 11, std sqrt(3), half-width 4.303 * sqrt(3) / sqrt(3)
    l1 = got["l1@PaS-A"]
    assert l1["seeds_pas"] == 3 and l1["diff_mean"] == pytest.approx(11.0)
    assert (l1["ci_low"], l1["ci_high"]) == (pytest.approx(6.697, abs=1e-3), pytest.approx(15.303, abs=1e-3))
    assert l1["verdict"] == "ahead"
    scratch = got["repvgg_a0_mini"]
    assert (scratch["test"], scratch["dof"], scratch["verdict"]) == ("Welch t", pytest.approx(4.0), "within noise")
    # PaS 90, 91, 95 (mean 92, var 7) against 94, 96 (mean 95, var 2): se^2 = 7/3 + 1, dof 200/67
    long = got["repvgg_a0_mini-140ep"]
    assert (long["against"], long["diff_mean"], long["dof"]) == ("scratch_long", -3.0, pytest.approx(200 / 67))
    with pytest.raises(PasError, match="two rows of pas PaS-A for seed 0"):
        comparison_rows(rows + [row("PaS-A", "pas", 1.0, 0)])


def test_claims_state_interval_verdicts():
    rows = [row("PaS-A", "pas", t, s) for s, t in enumerate((90.0, 91.0))]
    rows += [row("l1@PaS-A", "l1", t, s) for s, t in enumerate((80.0, 81.0))]  # +10, +10: ahead
    rows += [row("PaS-B", "pas", t, s, macs=2e6) for s, t in enumerate((90.0, 91.0))]
    rows += [row("uniform@PaS-B", "uniform", t, s, macs=2e6) for s, t in enumerate((92.0, 93.0))]  # -2, -2: behind
    rows += [row("a0", "scratch", t, s, macs=1.01e6) for s, t in enumerate((89.0, 90.0))]
    acc = accuracy_rows(rows)
    comparisons = comparison_rows(rows)
    masks = {"m": {"widths": [1, 4], "full_widths": [4, 4], "layer_sizes": [8, 4]}}
    runs = [{"method": "pas", "model": "PaS-A", "seed": "0", "masks": "m"}]
    conv = [{"model": "PaS-A", "seed": "0", "settled_epoch": 9.5, "unchanged_from_epoch": 9.9, "final_kept": 5,
             "full": 8}]
    text = claims_markdown(acc, comparisons, conv, [], runs, masks, search_epochs=10)
    cells = table_cells(text)
    assert ["PaS-A", "1.000M", "90.50 ± 0.71", "", "", "80.50 ± 0.71"] in cells
    assert ["PaS-A", "l1@PaS-A", "2", "+10.00", "[+10.00, +10.00]", "ahead"] in cells
    assert ["PaS-B", "uniform@PaS-B", "2", "-2.00", "[-2.00, -2.00]", "behind"] in cells
    assert ("PaS is ahead at 1, within noise at 0, behind at 1 of 2 comparisons (95% Student t interval of the "
            "per-seed differences). Against each baseline: uniform: ahead at 0, within noise at 0, behind at 1 of 1 "
            "targets; l1: ahead at 1, within noise at 0, behind at 0 of 1 targets.") in text
    assert "**Verdict: holds in part** at this scale." in text
    # a0 (MACs within 1% of PaS-A's target), Welch: difference +1, se sqrt(0.25 + 0.25), dof 2:
    # half-width 4.303 * 0.7071 = 3.04
    assert ["PaS-A", "a0", "2 / 2", "+1.00", "[-2.04, +4.04]", "within noise"] in cells
    assert "**Verdict: not shown**." in text  # within noise: no evidence either way
    assert ["PaS-A", "0", "9.50", "9.90", "5 / 8"] in cells
    assert "Settled before the last search epoch in 0 of 1 searches." in text
    assert "In 1 of 1 PaS searches the highest-resolution layers keep a smaller fraction" in text
    assert text.count("**Verdict: ") == 4
    found = json.loads(verdicts_json(claims(acc, comparisons, conv, [], runs, masks, 10)))["claims"]
    assert [(c["claim"], c["verdict"]) for c in found] == [("1", "holds in part"), ("1b", "not shown"),
                                                          ("2", "does not hold"), ("3", "holds")]
    assert found[0]["measured"].startswith("Paired by seed (the same pretrained network), PaS is ahead at 1,")
    # one seed: no interval, no verdict either way
    one = [r for r in rows if r["seed"] == 0]
    text = claims_markdown(accuracy_rows(one), comparison_rows(one), [], [], [], {}, search_epochs=10)
    assert ["PaS-A", "l1@PaS-A", "1", "+10.00", "", "one seed: no interval"] in table_cells(text)
    assert "**Verdict: untested** at this scale (one seed: no interval)." in text


def test_comparison_table_states_the_test_and_the_interval():
    rows = [row("PaS-A", "pas", t, s, macs=516544) for s, t in enumerate((90.0, 91.0, 95.0))]
    rows += [row("uniform@PaS-A", "uniform", t, s, macs=516544) for s, t in enumerate((89.0, 89.0, 92.0))]
    text = comparison_markdown(comparison_rows(rows))
    assert "paired by seed against a baseline" in text
    assert table_cells(text)[2] == ["PaS-A", "0.517M", "uniform@PaS-A", "paired t", "3", "92.00", "90.00", "+2.00",
                                    "[-0.48, +4.48]", "within noise"]


def test_run_specs_and_cli_errors(tmp_path):
    assert parse_run_spec("method=l1,model=PaS-A,seed=0,masks=m.json") == {
        "method": "l1", "model": "PaS-A", "seed": "0", "masks": "m.json"}
    with pytest.raises(PasError, match=r"a pas run needs history=PATH"):
        parse_run_spec("method=pas,model=PaS-A,seed=0,masks=m.json")
    with pytest.raises(PasError, match=r"'colour=red' is not KEY=VALUE"):
        parse_run_spec("method=l1,colour=red")
    table = tmp_path / "main.csv"
    table.write_text("model,method,seed,backbone,target_macs,macs,top1,top5,widths\nPaS-A,l1,0,b,1,1,50,90,1 2\n")
    r = subprocess.run([sys.executable, "-m", "pas.cli", "evidence", "--table", str(table), "--run",
                        f"method=l1,model=PaS-A,seed=0,masks={tmp_path / 'missing.json'}", "--search-epochs", "10",
                        "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"pas: error: '{tmp_path / 'missing.json'}' does not exist"]
    assert not (tmp_path / "out").exists()
    (tmp_path / "m.json").write_text(json.dumps({"widths": [1], "full_widths": [2], "layer_sizes": [4]}))
    r = subprocess.run([sys.executable, "-m", "pas.cli", "evidence", "--table", str(table), "--run",
                        f"method=l1,model=PaS-A,seed=0,masks={tmp_path / 'm.json'}", "--search-epochs", "0",
                        "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "pas: error: --search-epochs 0: expected a positive integer"


def test_claim_2_says_how_far_the_landing_moved_each_search():
    from pas.evidence import landing_rows, landing_sentence
    runs = [{"method": "pas", "model": "PaS-A", "seed": "0", "masks": "a"},
            {"method": "pas", "model": "PaS-B", "seed": "1", "masks": "b"},
            {"method": "uniform", "model": "PaS-A", "seed": "0", "masks": "u"}]
    masks = {"a": {"landing_moved_macs_share": 0.02}, "b": {"landing_moved_macs_share": 0.10},
             "u": {"landing_moved_macs_share": 0.5}}
    landing = landing_rows(runs, masks)
    assert landing == [{"model": "PaS-A", "seed": "0", "share": 0.02}, {"model": "PaS-B", "seed": "1", "share": 0.10}]
    assert landing_sentence(landing) == (
        " The landing after the search moved 6.0% of the full MACs on average (at most 10.0%, PaS-B seed 1); "
        "more than 5% in 1 of 2 searches, which had not reached their target on their own.")
    assert landing_sentence([]) == ""


def test_penalty_gradient_comparison_pairs_each_variant_with_its_output_partner(tmp_path, capsys):
    """benchmarks/penalty_gradient.py on a table of config/penalty.yaml's shape: output minus both
    paired by seed, each against uniform, the landing's moved share; hand-computed intervals."""
    from benchmarks.penalty_gradient import main
    rows = []
    # both 90, 91, 95; output 91, 93, 95 (differences 1, 2, 0); uniform 89, 90, 92
    for s, (both, output, uniform) in enumerate([(90, 91, 89), (91, 93, 90), (95, 95, 92)]):
        rows += [{"model": "PaS-A", "method": "pas", "seed": s, "top1": both, "landing_moved_share": 0.01},
                 {"model": "PaS-A-output", "method": "pas", "seed": s, "top1": output, "landing_moved_share": 0.03},
                 {"model": "uniform@PaS-A", "method": "uniform", "seed": s, "top1": uniform}]
    path = tmp_path / "main.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table = main([str(path)])
    (row,) = table.to_dict("records")
    # mean 1, std 1, t(0.975, 2) = 4.303: 1 -+ 4.303 / sqrt(3) = [-1.48, +3.48]
    assert row["output − both (95%)"] == "+1.00 [-1.48, +3.48] within noise"
    # both - uniform: 1, 1, 3 (mean 5/3, std 1.155): [-1.20, +4.54]; output - uniform: 2, 3, 3: [+1.23, +4.10]
    assert row["both − uniform"] == "+1.67 [-1.20, +4.54] within noise"
    assert row["output − uniform"] == "+2.67 [+1.23, +4.10] ahead"
    assert row["landing moved % (both / output)"] == "1.0 / 3.0"
    assert "All targets pooled (3 pairs): output − both +1.00 [-1.48, +3.48] within noise" in capsys.readouterr().out


def test_objective_comparison_pairs_each_variant_with_its_paper_partner(tmp_path, capsys):
    """benchmarks/objective.py on a table of config/objective.yaml's shape: paper minus constraint
    paired by seed; hand-computed interval."""
    from benchmarks.objective import main
    rows = []
    # constraint 92, 93, 94; paper 90, 92, 94 (differences -2, -1, 0)
    for s, (constraint, paper) in enumerate([(92, 90), (93, 92), (94, 94)]):
        rows += [{"model": "PaS-light-A", "method": "pas", "seed": s, "top1": constraint, "landing_moved_share": 0.002},
                 {"model": "PaS-light-A-paper", "method": "pas", "seed": s, "top1": paper, "landing_moved_share": 0.1},
                 {"model": "uniform@PaS-light-A", "method": "uniform", "seed": s, "top1": 88}]
    path = tmp_path / "main.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    (row,) = main([str(path)]).to_dict("records")
    # mean -1, std 1: -1 -+ 4.303 / sqrt(3) = [-3.48, +1.48]
    assert row["paper − constraint (95%)"] == "-1.00 [-3.48, +1.48] within noise"
    assert row["landing moved % (constraint / paper)"] == "0.2 / 10.0"


def test_rounding_cost_pairs_each_variant_with_its_x8_partner(tmp_path, capsys):
    """benchmarks/rounding_cost.py on a table of config/aligned.yaml's shape: x8 minus x1 paired by
    seed, the MACs each landed on; hand-computed interval."""
    from benchmarks.rounding_cost import main
    rows = []
    # x1 94, 93, 95; x8 92, 93, 92 (differences -2, 0, -3); MACs 515K and 510K / 512K / 508K
    for s, (x1, x8, macs8) in enumerate([(94, 92, 510_000), (93, 93, 512_000), (95, 92, 508_000)]):
        rows += [{"model": "PaS-A", "method": "pas", "seed": s, "top1": x1, "macs": 515_000, "landing_moved_share": 0.02},
                 {"model": "PaS-A-x8", "method": "pas", "seed": s, "top1": x8, "macs": macs8, "landing_moved_share": 0.06},
                 {"model": "uniform@PaS-A", "method": "uniform", "seed": s, "top1": 93}]
    path = tmp_path / "main.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    (row,) = main([str(path)]).to_dict("records")
    assert row["MACs (x1 / x8)"] == "515.0K / 510.0K"
    # mean -5/3, std 1.528, t(0.975, 2) = 4.303: -1.67 -+ 3.79 = [-5.46, +2.13]
    assert row["x8 − x1 (95%)"] == "-1.67 [-5.46, +2.13] within noise"
    assert row["x1 top-1"] == "94.00" and row["x8 top-1"] == "92.33"
    assert row["landing moved % (x1 / x8)"] == "2.0 / 6.0"
    assert "All targets pooled (3 pairs): x8 − x1 -1.67 [-5.46, +2.13] within noise" in capsys.readouterr().out


def test_latency_search_pairs_each_variant_with_its_latency_partner(tmp_path, capsys):
    """benchmarks/latency_search.py on a table of config/latency.yaml's shape over 2 seeds: the budget
    share from the table's full latency, each row's latency measured as a share of its full backbone
    in the same job, latency minus MACs top-1 paired by seed; hand-computed."""
    import json

    from benchmarks.latency_search import main
    rows = []
    # full 4.0 and 5.0 ms; MACs search 3.0 and 4.0 ms (shares 0.75, 0.80); latency search 2.6 and 4.4
    # (shares 0.65, 0.88); top-1 MACs 92, 93, latency 93, 93 (differences 1, 0)
    for s, (full, mine, theirs, top_mine, top_theirs) in enumerate([(4.0, 3.0, 2.6, 92, 93), (5.0, 4.0, 4.4, 93, 93)]):
        common = {"seed": s, "backbone": "repvgg_b0_mini", "landing_moved_share": 0.01}
        rows += [{**common, "model": "repvgg_b0_mini", "method": "full", "top1": 95, "macs": 1_000_000,
                  "latency_ms_b64": full},
                 {**common, "model": "PaS-A", "method": "pas", "top1": top_mine, "macs": 500_000,
                  "latency_ms_b64": mine},
                 {**common, "model": "PaS-A-latency", "method": "pas", "top1": top_theirs, "macs": 600_000,
                  "latency_ms_b64": theirs, "target_latency_ms": 3.2, "latency_table_batch": 64}]
    (tmp_path / "tables").mkdir()
    (tmp_path / "latency_tables").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "main.csv", index=False)
    # the table measured the full network at 4.0 ms: a 3.2 ms budget is 0.8 of it
    (tmp_path / "latency_tables" / "repvgg_b0_mini.json").write_text(json.dumps({"runtime": "pytorch", "full_ms": 4.0}))
    (row,) = main([str(tmp_path / "tables" / "main.csv")]).to_dict("records")
    assert row["MACs (MACs / latency)"] == "500.0K / 600.0K"
    assert row["budget share"] == "0.800 (latency_ms_b64)"
    assert row["measured share (MACs / latency)"] == "0.775 / 0.765"
    assert row["latency: measured / budget, per seed"] == "0.81 1.10"
    # differences 1, 0: mean 0.5, std 0.707, t(0.975, 1) = 12.706: 0.5 -+ 6.35 = [-5.85, +6.85]
    assert row["latency − MACs (95%)"] == "+0.50 [-5.85, +6.85] within noise"
    assert "All pairs pooled (2): latency − MACs top-1 +0.50 [-5.85, +6.85] within noise" in capsys.readouterr().out
