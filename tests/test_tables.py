"""pas tables: the rows read from the stages' JSON files, the CSV, Markdown and LaTeX written from
them (LaTeX's special characters escaped), the CSV read back, and the same table read from the
MLflow runs of a small pipeline run in this process."""
from __future__ import annotations

import csv
import json
import textwrap

import pytest

from pas import stages
from pas.cli import main as pas_main
from pas.config import load_config
from pas.errors import PasError
from pas.tables import as_records, read_table, table_frame, table_row, write_tables
from pas.tracking import ingest

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
        % Latency in ms (PyTorch; ORT: ONNX Runtime) and throughput in images/s measured on cpu.
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
    assert md.startswith("Latency in ms (PyTorch; ORT: ONNX Runtime) and throughput in images/s measured on "
                         "cpu.\n\n|")
    assert markdown_cells(md)[2:] == [
        [NAME, "pas", "b_0", "516.5K", "515.0K", "123.5K", "87.50", "99.00", "1.235", "810", "12", "33", ""],
        ["b_0", "full", "b_0", "", "2.500G", "1.0K", "90.00", "100.00", "2.000", "500", "", "", "100"]]
    # whole numbers without a decimal point, missing values as empty cells
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "model,method,seed,backbone,target_macs,target_latency_ms,predicted_latency_ms,latency_table_batch,macs,macs_ptflops,params,top1,"
        "top5,latency_ms_b1,throughput_b1,latency_device,search_s,finetune_s,train_s,macs_before_landing,"
        "landing_moved_channels,landing_moved_share,widths",
        f"{NAME},pas,0,b_0,516544,,,,515000,515000,123456,87.5,99.0,1.23456,810.0123,cpu,12.345,33.3,,,,,4 8 16",
        "b_0,full,0,b_0,,,,,2500000000,,999,90.0,100.0,2.0,500.0,cpu,,,100.5,,,,8 16 32"]
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
    files = {"eval": ev, "masks": {"target_macs": 516544, "search_macs_before_landing": 600000,
                                   "landing_moved_channels": 7, "landing_moved_macs_share": 0.0625},
             "search": {"wall_seconds": 12.5}, "finetune": {"wall_seconds": 30.25}}
    for key, value in files.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(value))
    spec = {key: str(tmp_path / f"{key}.json") for key in files}
    assert table_row(spec) == {
        "model": "PaS-A", "method": "pas", "seed": 1, "backbone": "b0", "target_macs": 516544, "macs": 515000,
        "macs_ptflops": None, "params": 123456, "top1": 87.5, "top5": 99.0, "latency_device": "cuda",
        "latency_ms_b1": 0.25, "throughput_b1": 4000.0, "latency_ms_b8": 0.5, "throughput_b8": 16000.0,
        "search_s": 12.5, "finetune_s": 30.25, "train_s": None, "widths": "4 8 16",
        "macs_before_landing": 600000, "landing_moved_channels": 7, "landing_moved_share": 0.0625,
        "target_latency_ms": None, "predicted_latency_ms": None, "latency_table_batch": None}
    # a reference network has no target even with masks; a row without a variant is named by its folder
    (tmp_path / "b0").mkdir()
    ref = {k: v for k, v in ev.items() if k != "variant"} | {"method": "full"}
    (tmp_path / "b0" / "eval.json").write_text(json.dumps(ref))
    row = table_row({"eval": str(tmp_path / "b0" / "eval.json"), "masks": spec["masks"]})
    assert (row["model"], row["target_macs"], row["search_s"]) == ("b0", None, None)

    rows = ",".join(f"{k}={v}" for k, v in spec.items())
    assert pas_main(["tables", "--row", rows, "--out-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "main.csv").read_text().splitlines() == [
        "model,method,seed,backbone,target_macs,target_latency_ms,predicted_latency_ms,latency_table_batch,macs,macs_ptflops,params,top1,"
        "top5,latency_ms_b1,throughput_b1,latency_ms_b8,throughput_b8,latency_device,search_s,finetune_s,train_s,"
        "macs_before_landing,landing_moved_channels,landing_moved_share,widths",
        "PaS-A,pas,1,b0,516544,,,,515000,,123456,87.5,99.0,0.25,4000.0,0.5,16000.0,cuda,12.5,30.25,,600000,7,0.0625,"
        "4 8 16"]
    # the landing's share shown in percent
    md = (tmp_path / "out" / "main.md").read_text()
    assert "landing moved %" in md and markdown_cells(md)[2][-1] == "6.2"


def test_the_latency_jobs_values_are_the_rows_latency(tmp_path):
    """With latency=PATH (pas latency's output), a row's PyTorch and ONNX Runtime latencies are the
    ones timed for its network (seed, method, model), not any in eval.json."""
    ev = {"top1": 50.0, "top5": 90.0, "macs": 1000, "params": 10, "variant": "uniform@PaS-A", "model": "PaS-A",
          "method": "uniform", "seed": "0", "latency_ms_cpu_b1": 9.0, "throughput_cpu_b1": 111.1}
    timed = {"rows": [
        {"model": "seed0/uniform/PaS-A", "runtime": "pytorch", "device": "cpu", "batch": 1, "latency_ms": 2.0,
         "throughput": 500.0},
        {"model": "seed0/uniform/PaS-A", "runtime": "onnxruntime", "device": "cpu", "batch": 1, "latency_ms": 0.5,
         "throughput": 2000.0},
        {"model": "seed0/pas/PaS-A", "runtime": "pytorch", "device": "cpu", "batch": 1, "latency_ms": 7.0,
         "throughput": 142.9}]}
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "latency.json").write_text(json.dumps(timed))
    row = table_row({"eval": str(tmp_path / "eval.json"), "latency": str(tmp_path / "latency.json")})
    assert (row["latency_ms_b1"], row["ort_latency_ms_b1"], row["throughput_b1"]) == (2.0, 0.5, 500.0)
    timed["rows"] = timed["rows"][2:]
    (tmp_path / "latency.json").write_text(json.dumps(timed))
    with pytest.raises(PasError, match=r"has no network 'seed0/uniform/PaS-A'; expected one pas latency timed"):
        table_row({"eval": str(tmp_path / "eval.json"), "latency": str(tmp_path / "latency.json")})


# -- the table from the MLflow store ----------------------------------------------------------------

BACKBONE = "repvgg_a0_mini"


def stage_config(tmp_path, tags: dict, *overrides: str) -> dict:
    """A tiny stage config logging to the store under tmp_path."""
    cfg = load_config(None, [f"backbone={BACKBONE}", "threads=1", "epochs=1", "batch_size=32", "progress=false",
                             "dataset.max_train=64", "dataset.max_val=32", "search.target=50%",
                             "evaluate.repeats=1", "evaluate.warmup=0", "evaluate.batch_sizes=[1, 4]",
                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                             f"tracking.artifact_root={tmp_path}/art", *overrides])
    return {**cfg, "tags": tags}


def row_tags(method: str, model: str) -> dict:
    """The tags the workflow gives every run of one table row (workflow/rules/common.smk, tags_for)."""
    variant = model if method in ("pas", "full", "scratch") else f"{method}@{model}"
    return {"variant": variant, "model": model, "method": method, "target": "50%", "seed": "0"}


def deploy_and_evaluate(tmp_path, d, tags: dict, weights) -> None:
    stages.deploy(stage_config(tmp_path, tags), weights=str(weights), masks=str(d / "masks.json"),
                  out_dir=str(d / "deploy"))
    stages.evaluate(stage_config(tmp_path, tags), arch=str(d / "deploy" / "arch.json"),
                    weights=str(d / "deploy" / "model.safetensors"), out=str(d / "eval.json"))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A PaS variant, a uniform baseline at its target and the full backbone, run in this process with
    MLflow on: the folder of their files and store."""
    tmp = tmp_path_factory.mktemp("pipeline")
    pre, pas_dir, uni, full = tmp / "pre", tmp / "PaS-T", tmp / "uniform", tmp / "full"
    stages.pretrain(stage_config(tmp, {"variant": BACKBONE, "model": BACKBONE, "method": "pretrain", "seed": "0"}),
                    out_weights=str(pre / "w.pt"), out_metrics=str(pre / "metrics.json"))
    pas_tags = row_tags("pas", "PaS-T")
    stages.search(stage_config(tmp, pas_tags), weights=str(pre / "w.pt"), out_weights=str(pas_dir / "search" / "w.pt"),
                  out_masks=str(pas_dir / "masks.json"), out_history=str(pas_dir / "history.json"),
                  out_metrics=str(pas_dir / "search" / "metrics.json"))
    stages.prune(stage_config(tmp, row_tags("uniform", "PaS-T"), "search.method=uniform"), weights=str(pre / "w.pt"),
                 out_masks=str(uni / "masks.json"))
    for d, tags, weights in ((pas_dir, pas_tags, pas_dir / "search" / "w.pt"),
                             (uni, row_tags("uniform", "PaS-T"), pre / "w.pt")):
        stages.finetune(stage_config(tmp, tags), weights=str(weights), masks=str(d / "masks.json"),
                        out_weights=str(d / "finetune" / "w.pt"), out_metrics=str(d / "finetune" / "metrics.json"))
        deploy_and_evaluate(tmp, d, tags, d / "finetune" / "w.pt")
    stages.prune(stage_config(tmp, row_tags("full", BACKBONE), "search.method=full"), weights=None,
                 out_masks=str(full / "masks.json"))
    deploy_and_evaluate(tmp, full, row_tags("full", BACKBONE), pre / "w.pt")
    # evaluated again: its newest run (and eval.json) replace the first
    stages.evaluate(stage_config(tmp, pas_tags), arch=str(pas_dir / "deploy" / "arch.json"),
                    weights=str(pas_dir / "deploy" / "model.safetensors"), out=str(pas_dir / "eval.json"))
    return tmp


def json_rows(tmp) -> list[str]:
    """The --row of each network, in the store table's order (seed, method, model)."""
    return [f"eval={tmp}/PaS-T/eval.json,masks={tmp}/PaS-T/masks.json,search={tmp}/PaS-T/search/metrics.json,"
            f"finetune={tmp}/PaS-T/finetune/metrics.json",
            f"eval={tmp}/uniform/eval.json,masks={tmp}/uniform/masks.json,finetune={tmp}/uniform/finetune/metrics.json",
            f"eval={tmp}/full/eval.json,masks={tmp}/full/masks.json,train={tmp}/pre/metrics.json"]


def tables_from(tmp, out: str, *source: str) -> dict[str, str]:
    assert pas_main(["tables", *source, "--out-dir", str(tmp / out)]) == 0
    return {ext: (tmp / out / f"main.{ext}").read_text() for ext in ("csv", "md", "tex")}


@pytest.mark.slow
def test_the_table_from_the_mlflow_store_is_the_table_from_the_json_files(pipeline, capsys):
    tmp = pipeline
    from_json = tables_from(tmp, "json", *(a for row in json_rows(tmp) for a in ("--row", row)))
    from_store = tables_from(tmp, "store", "--from-mlflow", f"sqlite:///{tmp}/mlflow.db")
    assert from_store == from_json
    # the values are the files' (the evaluation, the masks' target, the stages' wall times)
    with open(tmp / "store" / "main.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["PaS-T", "uniform@PaS-T", BACKBONE]
    for name, d in (("PaS-T", "PaS-T"), ("uniform@PaS-T", "uniform"), (BACKBONE, "full")):
        ev = json.loads((tmp / d / "eval.json").read_text())
        assert (float(rows[name]["top1"]), int(rows[name]["macs"]), rows[name]["widths"]) == \
            (ev["top1"], ev["macs"], " ".join(map(str, ev["widths"])))
        assert float(rows[name]["latency_ms_b4"]) == ev["latency_ms_cpu_b4"]
    wall = {p: json.loads((tmp / p).read_text())["wall_seconds"]
            for p in ("PaS-T/search/metrics.json", "PaS-T/finetune/metrics.json", "pre/metrics.json")}
    assert (float(rows["PaS-T"]["search_s"]), float(rows["PaS-T"]["finetune_s"]), rows["PaS-T"]["train_s"]) == \
        (wall["PaS-T/search/metrics.json"], wall["PaS-T/finetune/metrics.json"], "")
    assert (rows[BACKBONE]["target_macs"], float(rows[BACKBONE]["train_s"])) == ("", wall["pre/metrics.json"])
    target = json.loads((tmp / "uniform" / "masks.json").read_text())["target_macs"]
    assert (int(rows["uniform@PaS-T"]["target_macs"]), rows["uniform@PaS-T"]["search_s"]) == (target, "")

    uri = f"sqlite:///{tmp}/mlflow.db"
    assert pas_main(["tables", "--from-mlflow", uri, "--experiment", "nope", "--out-dir", str(tmp / "nope")]) == 2
    assert capsys.readouterr().err == f"pas: error: MLflow store {uri!r} has no experiment 'nope'\n"


@pytest.mark.slow
def test_the_table_from_a_store_rebuilt_from_the_run_records_is_the_same(pipeline):
    """The cluster mode: jobs write run records, one step ingests them into a store."""
    tmp = pipeline
    records = sorted(tmp.rglob("*.run.json")) + sorted(tmp.rglob("run.json"))
    ingest(records, uri=f"sqlite:///{tmp}/ingested.db", experiment="pas", artifact_root=str(tmp / "art2"))
    from_store = tables_from(tmp, "ingested", "--from-mlflow", f"sqlite:///{tmp}/ingested.db")
    assert from_store == tables_from(tmp, "json2", *(a for row in json_rows(tmp) for a in ("--row", row)))


def test_bad_mlflow_sources_are_one_line_errors(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/none.db"
    assert pas_main(["tables", "--from-mlflow", missing, "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"pas: error: MLflow store {missing!r} does not exist; expected the store the "
                                       f"stages logged to\n")
    assert pas_main(["tables", "--row", "eval=e.json", "--experiment", "x", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("pas: error: --experiment 'x': expected it with --from-mlflow (the JSON rows "
                                       "of --row have no experiment)\n")
    assert not list(tmp_path.iterdir())
