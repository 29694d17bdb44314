"""The results table: one row per network (PaS variant, baseline, reference), as CSV, Markdown and LaTeX.

Every row is read from the JSON files the stages wrote; which files belong to one row is said by the
caller (the workflow), one `--row eval=PATH,masks=PATH,search=PATH,finetune=PATH,train=PATH` each:

    eval      pas evaluate's output (required): accuracy, MACs, params, tags
    latency   pas latency's output: the latencies of every network timed side by side (the row's
              entry is seed{S}/{method}/{model}); PyTorch's are `latency_ms_bN`/`throughput_bN`,
              ONNX Runtime's `ort_latency_ms_bN`, on the GPU when it was timed there, else the CPU
    masks     masks.json of pas search / pas prune: the target MACs the row was pruned to
    search    pas search's metrics: search wall time
    finetune  pas finetune's metrics: fine-tune wall time
    train     pas pretrain's metrics: training wall time of a reference network

or, with `--from-mlflow URI`, from the runs the same stages logged to an MLflow store: each
evaluate run is a row, the search, prune, finetune and pretrain runs of the same variant and seed
give its target and wall times.

The table is a pandas DataFrame, and pandas writes it: the CSV, the Markdown (through tabulate) and
the LaTeX (through Styler, which escapes LaTeX's special characters).
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pas.config import BASELINES, REFERENCE_METHODS
from pas.errors import PasError
from pas.io import atomic_write_text, read_json

# a task's own quality: a generator's (pas.translation), a YOLACT's COCO AP (pas.segmentation)
TASK_COLUMNS = ("psnr", "val_l1", "mask_ap", "mask_ap50", "box_ap", "box_ap50")
ROW_KEYS = ("eval", "masks", "search", "finetune", "train", "latency")
COLUMNS = ["model", "method", "seed", "backbone", "target_macs", "target_latency_ms", "predicted_latency_ms",
           "latency_table_batch", "macs",
           "macs_ptflops", "params", "top1", "top5", *TASK_COLUMNS, "latency_device", "search_s", "finetune_s", "train_s",
           "macs_before_landing", "landing_moved_channels", "landing_moved_share", "widths"]
TEXT_COLUMNS = ("model", "method", "backbone", "latency_device", "widths")
# Whole numbers: the CSV writes them without a decimal point, and an empty cell where there is none.
COUNT_COLUMNS = ("seed", "target_macs", "latency_table_batch", "macs", "macs_ptflops", "params",
                 "macs_before_landing", "landing_moved_channels")
# Shown in the Markdown/LaTeX tables (the CSV has every column), with their headings.
DISPLAY = {"model": "model", "method": "method", "seed": "seed", "backbone": "backbone", "target_macs": "target MACs",
           "macs": "MACs", "params": "params", "top1": "top-1 %", "top5": "top-5 %"}
LEFT_ALIGNED = ("model", "method", "backbone")
METHOD_ORDER = ("pas", *BASELINES, *REFERENCE_METHODS)
_LATENCY = re.compile(r"latency_ms_(?P<device>[a-z]+)_b(?P<batch>\d+)$")
_EVAL_KEYS = ("macs", "params")  # and top1/top5 (a classifier's) or a task's columns


def parse_spec(text: str, *, what: str, keys: tuple[str, ...], value: str = "PATH") -> dict[str, str]:
    """'k1=v1,k2=v2' -> {'k1': 'v1', 'k2': 'v2'}, every key one of `keys` (a `--row`, a `--run`)."""
    spec = {}
    for part in filter(None, text.split(",")):
        key, sep, v = part.partition("=")
        if not sep or key not in keys or not v:
            raise PasError(f"{what} {text!r}: {part!r} is not KEY={value} with KEY one of {', '.join(keys)}")
        spec[key] = v
    return spec


def parse_row_spec(text: str) -> dict[str, str]:
    """'eval=a.json,search=b.json' -> {'eval': 'a.json', 'search': 'b.json'}."""
    spec = parse_spec(text, what="row", keys=ROW_KEYS)
    if "eval" not in spec:
        raise PasError(f"row {text!r} has no eval=PATH")
    return spec


def latency_device(result: dict) -> str:
    """The device latency is reported for: the GPU when it was measured there, else the CPU."""
    devices = {m["device"] for k in result if (m := _LATENCY.match(k))}
    return "cuda" if "cuda" in devices else "cpu"


# -- rows ------------------------------------------------------------------------------------------

def latency_name(ev: dict) -> str:
    """How pas latency's output names a row's network (the workflow's --model NAME)."""
    return f"seed{ev.get('seed')}/{ev.get('method')}/{ev.get('model', ev.get('variant'))}"


def timed_values(latency: dict, name: str, source: str) -> dict:
    """One network's rows of pas latency's output, as evaluate-style keys:
    latency_ms_{device}_bN / throughput_{device}_bN (PyTorch), ort_latency_ms_{device}_bN (ONNX Runtime)."""
    rows = [r for r in latency["rows"] if r["model"] == name]
    if not rows:
        raise PasError(f"{source} has no network {name!r}; expected one pas latency timed")
    values = {}
    for r in rows:
        prefix = "" if r["runtime"] == "pytorch" else "ort_"
        values[f"{prefix}latency_ms_{r['device']}_b{r['batch']}"] = r["latency_ms"]
        if not prefix:
            values[f"throughput_{r['device']}_b{r['batch']}"] = r["throughput"]
    return values


def eval_row(ev: dict, source: str, *, target_macs=None, search_s=None, finetune_s=None, train_s=None) -> dict:
    """One row from an evaluation's values (pas evaluate's output, or its MLflow run's metrics and
    tags, with pas latency's values of the network) and the target and wall times of the stages
    before it; `source` names it in errors."""
    missing = [k for k in _EVAL_KEYS if k not in ev]
    if "top1" not in ev and not any(k in ev for k in TASK_COLUMNS):
        missing.append("top1")
    if missing:
        raise PasError(f"{source} has no {missing[0]!r}; expected the values of pas evaluate")
    device = latency_device(ev)
    seed = ev.get("seed")
    row = {"model": ev["variant"], "method": ev.get("method", ""), "seed": None if seed is None else int(seed),
           "backbone": ev.get("backbone", ""), "macs": ev["macs"], "macs_ptflops": ev.get("macs_ptflops"),
           "params": ev["params"], "top1": ev.get("top1"), "top5": ev.get("top5"), "latency_device": device,
           **{k: ev[k] for k in TASK_COLUMNS if k in ev},
           # a reference network (the full backbone, one trained from scratch) has no target
           "target_macs": None if ev.get("method") in REFERENCE_METHODS else target_macs,
           "search_s": search_s, "finetune_s": finetune_s, "train_s": train_s,
           "widths": " ".join(str(w) for w in ev.get("widths", []))}
    for key, value in ev.items():
        m = _LATENCY.match(key)
        if m and m["device"] == device:
            row[f"latency_ms_b{m['batch']}"] = value
            row[f"throughput_b{m['batch']}"] = ev.get(f"throughput_{device}_b{m['batch']}")
            if f"ort_{key}" in ev:
                row[f"ort_latency_ms_b{m['batch']}"] = ev[f"ort_{key}"]
    return row


def table_row(spec: dict[str, str]) -> dict:
    """One row from the files of one network."""
    ev = {"variant": Path(spec["eval"]).parent.name, **read_json(spec["eval"])}
    if "latency" in spec:
        ev.update(timed_values(read_json(spec["latency"]), latency_name(ev), repr(spec["latency"])))
    masks = read_json(spec["masks"]) if "masks" in spec else {}
    times = {f"{key}_s": read_json(spec[key])["wall_seconds"] for key in ("search", "finetune", "train") if key in spec}
    row = eval_row(ev, repr(spec["eval"]), target_macs=masks.get("target_macs"), **times)
    return {**row, **landing_values(masks)}


# the table's landing columns and the masks.json fields / search and prune metrics they come from
LANDING_METRICS = {"macs_before_landing": "search_macs_before_landing",
                   "landing_moved_channels": "landing_moved_channels",
                   "landing_moved_share": "landing_moved_macs_share",
                   # a latency budget: its target and the latency table's prediction for the landed widths
                   "target_latency_ms": "target_latency_ms", "predicted_latency_ms": "predicted_latency_ms",
                   "latency_table_batch": "latency_table_batch"}


def landing_values(masks: dict) -> dict:
    """What the landing after a search (or a baseline's scoring) moved: the MACs before it, the
    channels it added plus removed, and the share of the full network's MACs it moved (absent where
    the ranking is the landing itself: bn_gamma, l1); for a latency budget its target and the
    latency the table predicts for the landed widths."""
    return {column: masks.get(field) for column, field in LANDING_METRICS.items()}


def columns(names) -> list[str]:
    """COLUMNS with the latency/throughput columns of the measured batch sizes after the accuracy; a
    task's columns (TASK_COLUMNS) only where the rows have them."""
    kinds = ("latency_ms_b", "ort_latency_ms_b", "throughput_b")
    timed = sorted({k for k in names if k.startswith(kinds)},
                   key=lambda k: (int(k.rsplit("_b", 1)[1]), [k.startswith(x) for x in kinds].index(True)))
    names = set(names)
    base = [c for c in COLUMNS if c not in TASK_COLUMNS or c in names]
    i = base.index("latency_device")
    return base[:i] + timed + base[i:]


def table_frame(rows) -> pd.DataFrame:
    """The table of `rows` (dicts or a frame): its columns in table order, counts as whole numbers,
    every other number a float, text as text."""
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise PasError("no rows to tabulate")
    frame = frame.reindex(columns=columns(frame.columns))
    numbers = [c for c in frame.columns if c not in TEXT_COLUMNS and c not in COUNT_COLUMNS]
    return frame.astype({**{c: "Int64" for c in COUNT_COLUMNS}, **{c: "float64" for c in numbers}})


def in_table_order(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows by seed, then method (METHOD_ORDER, others after it by name), then model name."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    order = frame.assign(_rank=frame["method"].map(rank).fillna(len(METHOD_ORDER)))
    order = order.sort_values(["seed", "_rank", "method", "model"], kind="stable", na_position="first")
    return order.drop(columns="_rank").reset_index(drop=True)


# -- rows from an MLflow store ---------------------------------------------------------------------

_RUN_KEY = ("tags.variant", "tags.seed")


def store_rows(uri: str, experiment: str) -> list[dict]:
    """One row per network and seed from the finished runs of `experiment`: the newest evaluate run
    of each, with the target of its search or prune run and the wall times of its search, finetune
    and pretrain runs (the runs of the same variant and seed)."""
    runs = finished_runs(uri, experiment)
    evals = newest_runs(runs, "evaluate")
    if evals.empty:
        raise PasError(f"experiment {experiment!r} of MLflow store {uri!r} has no finished evaluate run; "
                       f"expected the runs of pas evaluate")
    target = {**stage_values(runs, "search", "target_macs"), **stage_values(runs, "prune", "target_macs")}
    times = {f"{stage}_s": stage_values(runs, stage, "wall_seconds") for stage in ("search", "finetune")}
    times["train_s"] = stage_values(runs, "pretrain", "wall_seconds")
    landing = {column: {**stage_values(runs, "search", metric), **stage_values(runs, "prune", metric)}
               for column, metric in LANDING_METRICS.items()}
    rows = []
    for run in evals.to_dict("records"):
        key = tuple(run[k] for k in _RUN_KEY)
        row = eval_row(run_values(run), f"evaluate run {run['run_id']}", target_macs=target.get(key),
                       **{column: values.get(key) for column, values in times.items()})
        rows.append({**row, **{column: values.get(key) for column, values in landing.items()}})
    return rows


def finished_runs(uri: str, experiment: str) -> pd.DataFrame:
    """Every finished run of `experiment` (mlflow.search_runs' frame), newest first."""
    import mlflow
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise PasError(f"MLflow store {uri!r} does not exist; expected the store the stages logged to")
    try:  # an unreadable database, a server that does not answer: one line, not a traceback
        found = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception as e:
        raise PasError(f"MLflow store {uri!r} cannot be read: {str(e).splitlines()[0]}") from None
    if found is None:
        raise PasError(f"MLflow store {uri!r} has no experiment {experiment!r}")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # search_runs reads the process's store; given back below
    try:
        runs = mlflow.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
    finally:
        mlflow.set_tracking_uri(previous)
    if "tags.backbone" in runs:  # a run without a variant tag is its backbone's, as its run name says
        runs["tags.variant"] = runs.reindex(columns=["tags.variant"])["tags.variant"].fillna(runs["tags.backbone"])
    return runs


def newest_runs(runs: pd.DataFrame, stage: str) -> pd.DataFrame:
    """The newest run of `stage` per variant and seed: a stage run again replaces its earlier runs."""
    if runs.empty or "tags.stage" not in runs:
        return runs.iloc[0:0]
    return runs[runs["tags.stage"] == stage].drop_duplicates(list(_RUN_KEY))  # runs come newest first


def stage_values(runs: pd.DataFrame, stage: str, metric: str) -> dict[tuple, float]:
    """{(variant, seed): the metric's value in that row's newest `stage` run}, where it was logged."""
    newest = newest_runs(runs, stage)
    if f"metrics.{metric}" not in newest:
        return {}
    logged = newest[newest[f"metrics.{metric}"].notna()]
    return dict(zip(zip(*(logged[k] for k in _RUN_KEY)), logged[f"metrics.{metric}"]))


def run_values(run: dict) -> dict:
    """A run's logged metrics and tags by name, as pas evaluate's output holds them."""
    values = {k.split(".", 1)[1]: v for k, v in run.items()
              if k.startswith(("metrics.", "tags.")) and not pd.isna(v)}
    values["widths"] = values.get("widths", "").split()
    return values


# -- CSV, Markdown and LaTeX -----------------------------------------------------------------------

def _fmt(key: str, value) -> str:
    if pd.isna(value) or value == "":
        return ""
    if key == "landing_moved_share":
        return f"{100 * float(value):.1f}"
    if key in ("target_macs", "macs", "macs_ptflops", "params"):
        v = float(value)
        return f"{v / 1e9:.3f}G" if v >= 1e9 else f"{v / 1e6:.3f}M" if v >= 1e6 else f"{v / 1e3:.1f}K"
    if key in ("top1", "top5", "psnr", "mask_ap", "mask_ap50", "box_ap", "box_ap50"):
        return f"{float(value):.2f}"
    if key == "val_l1":
        return f"{float(value):.4f}"
    if key.startswith(("latency_ms", "ort_latency_ms")) or key.endswith("_latency_ms"):
        return f"{float(value):.3f}"
    if key.startswith("throughput") or key.endswith("_s"):
        return f"{float(value):.0f}"
    return str(value)


def _display_columns(frame: pd.DataFrame) -> dict[str, str]:
    """The shown columns and their headings; `seed` only when the rows come from several seeds."""
    shown = dict(DISPLAY)
    if frame["seed"].nunique(dropna=False) < 2:
        del shown["seed"]
    for c in frame.columns:
        if c.startswith("latency_ms_b"):
            shown[c] = f"ms b{c.rsplit('_b', 1)[1]}"
        elif c.startswith("ort_latency_ms_b"):
            shown[c] = f"ORT ms b{c.rsplit('_b', 1)[1]}"
        elif c.startswith("throughput_b"):
            shown[c] = f"img/s b{c.rsplit('_b', 1)[1]}"
    shown.update({"search_s": "search s", "finetune_s": "fine-tune s", "train_s": "train s"})
    if "psnr" in frame:  # a translation's rows
        shown.update({"psnr": "PSNR dB", "val_l1": "L1"})
    if "mask_ap" in frame:  # a segmentation's rows: COCO AP, no top-1
        shown.update({"mask_ap": "mask AP", "mask_ap50": "mask AP50", "box_ap": "box AP", "box_ap50": "box AP50"})
        if frame["top1"].isna().all():
            del shown["top1"], shown["top5"]
    if frame["landing_moved_share"].notna().any():  # shown where a landing moved anything
        shown["landing_moved_share"] = "landing moved %"
    if frame["target_latency_ms"].notna().any():  # shown where a variant has a latency budget
        shown.update({"target_latency_ms": "target ms", "predicted_latency_ms": "predicted ms",
                      "latency_table_batch": "at batch"})
    return {c: shown[c] for c in frame.columns if c in shown}


def display_frame(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The shown columns of the table under their headings, every cell formatted as text, and the
    columns' alignment ('l' text, 'r' numbers)."""
    shown = _display_columns(frame)
    cells = pd.DataFrame({heading: frame[c].map(lambda v, c=c: _fmt(c, v)) for c, heading in shown.items()})
    return cells, "".join("l" if c in LEFT_ALIGNED else "r" for c in shown)


def csv_text(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False, lineterminator="\n")


def markdown_text(cells: pd.DataFrame, align: str) -> str:
    """A pipe table of text cells, each column aligned as `align` says ('l' or 'r' per column)."""
    sides = {"l": "left", "r": "right"}
    # the cells are formatted already: tabulate must not read "90.50" as a number and print 90.5
    return cells.to_markdown(index=False, colalign=[sides[a] for a in align], disable_numparse=True) + "\n"


def latex_text(cells: pd.DataFrame, align: str) -> str:
    """A tabular of text cells with every LaTeX special character escaped and ± as $\\pm$."""
    def pm(text: str) -> str:  # runs after the escaping, so the $ stays math mode
        return text.replace("±", "$\\pm$")
    hline = [{"selector": rule, "props": ":hline;"} for rule in ("toprule", "midrule", "bottomrule")]
    styler = (cells.style.hide(axis="index").format(pm, escape="latex").format_index(pm, escape="latex", axis=1)
              .set_table_styles(hline))
    return styler.to_latex(column_format=align)


def write_tables(frame: pd.DataFrame, out_dir: str | Path, stem: str = "main") -> list[Path]:
    """out_dir/stem.csv, .md and .tex, each written atomically."""
    out_dir = Path(out_dir)
    device = " and ".join(sorted(frame["latency_device"].unique()))
    note = f"Latency in ms (PyTorch; ORT: ONNX Runtime) and throughput in images/s measured on {device}."
    cells, align = display_frame(frame)
    texts = {"csv": csv_text(frame), "md": f"{note}\n\n{markdown_text(cells, align)}",
             "tex": f"% {note}\n{latex_text(cells, align)}"}
    paths = []
    for ext, text in texts.items():
        atomic_write_text(out_dir / f"{stem}.{ext}", text)
        paths.append(out_dir / f"{stem}.{ext}")
    return paths


# -- reading the CSV back --------------------------------------------------------------------------

def read_table(path: str | Path) -> pd.DataFrame:
    """The CSV pas tables wrote: text columns as text (empty, not missing, where blank), `seed` a
    whole number, every other column a float, blank cells missing."""
    try:
        # only a blank cell is missing: a model named "NA" or "nan" stays a name
        frame = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise PasError(f"table {str(path)!r} does not exist") from None
    except pd.errors.EmptyDataError:
        raise PasError(f"table {str(path)!r} is empty; expected the CSV written by pas tables") from None
    missing = [c for c in ("model", "method") if c not in frame]
    if missing:
        raise PasError(f"table {str(path)!r} has no column {missing[0]!r}; expected the CSV written by pas tables")
    text = [c for c in TEXT_COLUMNS if c in frame]
    frame[text] = frame[text].fillna("")
    numbers = [c for c in frame.columns if c not in TEXT_COLUMNS and c != "seed"]
    return frame.astype({**({"seed": "Int64"} if "seed" in frame else {}), **{c: "float64" for c in numbers}})


def as_records(frame: pd.DataFrame) -> list[dict]:
    """The rows as dicts: missing values None, `widths` a list of ints."""
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for r in records:
        if "widths" in r:
            r["widths"] = [int(w) for w in (r["widths"] or "").split()]
    return records


# -- command line ----------------------------------------------------------------------------------

def main(args) -> int:
    if args.from_mlflow:
        frame = in_table_order(table_frame(store_rows(args.from_mlflow, args.experiment or "pas")))
    elif args.experiment:
        raise PasError(f"--experiment {args.experiment!r}: expected it with --from-mlflow (the JSON rows of "
                       f"--row have no experiment)")
    else:
        frame = table_frame([table_row(parse_row_spec(text)) for text in args.row])
    for path in write_tables(frame, args.out_dir, args.stem):
        print(path)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("tables", help="results table (CSV, Markdown, LaTeX) from the stages' JSON files or "
                                      "their MLflow runs")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--row", action="append", metavar="eval=PATH[,masks=PATH,...]",
                        help=f"the files of one network; keys: {', '.join(ROW_KEYS)} (repeat per row)")
    source.add_argument("--from-mlflow", metavar="URI",
                        help="read the rows from the runs in this MLflow store instead (rows by seed, method, model)")
    p.add_argument("--experiment", help="the MLflow experiment of --from-mlflow (default: pas)")
    p.add_argument("--out-dir", required=True, help="writes STEM.csv, STEM.md and STEM.tex here")
    p.add_argument("--stem", default="main", help="file name stem (default: main)")
    p.set_defaults(func=main)
