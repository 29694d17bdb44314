"""pas tables: the rows read from the stages' JSON files, the CSV, Markdown and LaTeX written from
them (LaTeX's special characters escaped), and the CSV read back."""
from __future__ import annotations

import csv
import json
import textwrap

from pas.cli import main as pas_main
from pas.tables import as_records, read_table, table_frame, table_row, write_tables

# every character LaTeX treats specially, in one model name
NAME = "a_b%c&d#e~f^g\\h{i}$j"
NAME_TEX = r"a\_b\%c\&d\#e\textasciitilde f\textasciicircum g\textbackslash h\{i\}\$j"


def rows() -> list[dict]:
    """A PaS row and its full backbone, as table_row gives them."""
    return [{"model": NAME, "method": "pas", "seed": 0, "backbone": "b_0", "target_macs": 516544, "macs": 515000,
             "macs_ptflops": 515000, "params": 123456, "top1": 87.5, "top5": 99.0, "latency_device": "cpu",
             "latency_ms_b1": 1.23456, "throughput_b1": 810.0123, "search_s": 12.345, "finetune_s": 33.3,
             "train_s": None, "widths": "4 8 16"},
            {"model": "b_0", "method": "full", "seed": 0, "backbone": "b_0", "target_macs": None,
             "macs": 2500000000, "macs_ptflops": None, "params": 999, "top1": 90.0, "top5": 100.0,
             "latency_device": "cpu", "latency_ms_b1": 2.0, "throughput_b1": 500.0, "search_s": None,
             "finetune_s": None, "train_s": 100.5, "widths": "8 16 32"}]


def markdown_cells(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_latex_escapes_every_special_character_and_markdown_and_csv_keep_the_name(tmp_path):
    write_tables(table_frame(rows()), tmp_path, "t")
    assert (tmp_path / "t.tex").read_text() == textwrap.dedent(rf"""
        % Latency in ms and throughput in images/s measured on cpu.
        \begin{{tabular}}{{lllrrrrrrrrrr}}
        \hline
        model & method & backbone & target MACs & MACs & params & top-1 \% & top-5 \% & ms b1 & img/s b1 & search s & fine-tune s & train s \\
        \hline
        {NAME_TEX} & pas & b\_0 & 516.5K & 515.0K & 123.5K & 87.50 & 99.00 & 1.235 & 810 & 12 & 33 &  \\
        b\_0 & full & b\_0 &  & 2.500G & 1.0K & 90.00 & 100.00 & 2.000 & 500 &  &  & 100 \\
        \hline
        \end{{tabular}}
        """).lstrip()
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("Latency in ms and throughput in images/s measured on cpu.\n\n|")
    assert markdown_cells(md)[2:] == [
        [NAME, "pas", "b_0", "516.5K", "515.0K", "123.5K", "87.50", "99.00", "1.235", "810", "12", "33", ""],
        ["b_0", "full", "b_0", "", "2.500G", "1.0K", "90.00", "100.00", "2.000", "500", "", "", "100"]]
    # whole numbers without a decimal point, missing values as empty cells
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "model,method,seed,backbone,target_macs,macs,macs_ptflops,params,top1,top5,latency_ms_b1,throughput_b1,"
        "latency_device,search_s,finetune_s,train_s,widths",
        f"{NAME},pas,0,b_0,516544,515000,515000,123456,87.5,99.0,1.23456,810.0123,cpu,12.345,33.3,,4 8 16",
        "b_0,full,0,b_0,,2500000000,,999,90.0,100.0,2.0,500.0,cpu,,,100.5,8 16 32"]
    with open(tmp_path / "t.csv", newline="") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [NAME, "b_0"]
    back = as_records(read_table(tmp_path / "t.csv"))
    assert [r["model"] for r in back] == [NAME, "b_0"]
    assert back[0]["widths"] == [4, 8, 16] and back[0]["seed"] == 0 and back[0]["train_s"] is None
    assert back[1]["target_macs"] is None and back[1]["macs"] == 2.5e9


def test_the_seed_column_is_shown_when_the_rows_come_from_several_seeds(tmp_path):
    two = rows() + [{**r, "seed": 1} for r in rows()]
    write_tables(table_frame(two), tmp_path, "t")
    cells = markdown_cells((tmp_path / "t.md").read_text())
    assert cells[0][:4] == ["model", "method", "seed", "backbone"]
    assert [c[2] for c in cells[2:]] == ["0", "0", "1", "1"]


def test_a_row_is_read_from_the_files_of_one_network(tmp_path):
    """Latency of the GPU where it was measured there, the target of the masks, the stages' wall times."""
    ev = {"top1": 87.5, "top5": 99.0, "macs": 515000, "macs_ptflops": None, "params": 123456, "widths": [4, 8, 16],
          "latency_ms_cpu_b1": 1.5, "throughput_cpu_b1": 666.7, "latency_ms_cuda_b1": 0.25,
          "throughput_cuda_b1": 4000.0, "latency_ms_cuda_b8": 0.5, "throughput_cuda_b8": 16000.0,
          "variant": "PaS-A", "method": "pas", "seed": "1", "backbone": "b0"}
    files = {"eval": ev, "masks": {"target_macs": 516544}, "search": {"wall_seconds": 12.5},
             "finetune": {"wall_seconds": 30.25}}
    for key, value in files.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(value))
    spec = {key: str(tmp_path / f"{key}.json") for key in files}
    assert table_row(spec) == {
        "model": "PaS-A", "method": "pas", "seed": 1, "backbone": "b0", "target_macs": 516544, "macs": 515000,
        "macs_ptflops": None, "params": 123456, "top1": 87.5, "top5": 99.0, "latency_device": "cuda",
        "latency_ms_b1": 0.25, "throughput_b1": 4000.0, "latency_ms_b8": 0.5, "throughput_b8": 16000.0,
        "search_s": 12.5, "finetune_s": 30.25, "train_s": None, "widths": "4 8 16"}
    # a reference network has no target even with masks; a row without a variant is named by its folder
    (tmp_path / "b0").mkdir()
    ref = {k: v for k, v in ev.items() if k != "variant"} | {"method": "full"}
    (tmp_path / "b0" / "eval.json").write_text(json.dumps(ref))
    row = table_row({"eval": str(tmp_path / "b0" / "eval.json"), "masks": spec["masks"]})
    assert (row["model"], row["target_macs"], row["search_s"]) == ("b0", None, None)

    rows = ",".join(f"{k}={v}" for k, v in spec.items())
    assert pas_main(["tables", "--row", rows, "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "main.csv").read_text().splitlines() == [
        "model,method,seed,backbone,target_macs,macs,macs_ptflops,params,top1,top5,latency_ms_b1,throughput_b1,"
        "latency_ms_b8,throughput_b8,latency_device,search_s,finetune_s,train_s,widths",
        "PaS-A,pas,1,b0,516544,515000,,123456,87.5,99.0,0.25,4000.0,0.5,16000.0,cuda,12.5,30.25,,4 8 16"]
