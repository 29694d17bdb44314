"""The results table: one row per network (PaS variant, baseline, reference), as CSV, Markdown and LaTeX.

Every row is read from the JSON files the stages wrote; which files belong to one row is said by the
caller (the workflow), one `--row eval=PATH,masks=PATH,search=PATH,finetune=PATH,train=PATH` each:

    eval      pas evaluate's output (required): accuracy, MACs, params, latency, tags
    masks     masks.json of pas search / pas prune: the target MACs the row was pruned to
    search    pas search's metrics: search wall time
    finetune  pas finetune's metrics: fine-tune wall time
    train     pas pretrain's metrics: training wall time of a reference network
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from pas.errors import PasError
from pas.io import atomic_write_text, read_json

ROW_KEYS = ("eval", "masks", "search", "finetune", "train")
COLUMNS = ["model", "method", "seed", "backbone", "target_macs", "macs", "macs_ptflops", "params", "top1", "top5",
           "latency_device", "search_s", "finetune_s", "train_s", "widths"]
# Shown in the Markdown/LaTeX tables (the CSV has every column), with their headings.
DISPLAY = {"model": "model", "method": "method", "seed": "seed", "backbone": "backbone", "target_macs": "target MACs",
           "macs": "MACs", "params": "params", "top1": "top-1 %", "top5": "top-5 %"}
_LATENCY = re.compile(r"latency_ms_(?P<device>[a-z]+)_b(?P<batch>\d+)$")


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


def table_row(spec: dict[str, str]) -> dict:
    """One row from the files of one network."""
    ev = read_json(spec["eval"])
    device = latency_device(ev)
    seed = ev.get("seed")
    row = {"model": ev.get("variant", Path(spec["eval"]).parent.name), "method": ev.get("method", ""),
           "seed": None if seed is None else int(seed),
           "backbone": ev.get("backbone", ""), "target_macs": None, "macs": ev["macs"],
           "macs_ptflops": ev.get("macs_ptflops"), "params": ev["params"], "top1": ev["top1"],
           "top5": ev["top5"], "latency_device": device}
    for key, value in ev.items():
        m = _LATENCY.match(key)
        if m and m["device"] == device:
            row[f"latency_ms_b{m['batch']}"] = value
            row[f"throughput_b{m['batch']}"] = ev.get(f"throughput_{device}_b{m['batch']}")
    if "masks" in spec and row["method"] not in ("full", "scratch"):
        row["target_macs"] = read_json(spec["masks"]).get("target_macs")
    for key in ("search", "finetune", "train"):
        row[f"{key}_s"] = read_json(spec[key])["wall_seconds"] if key in spec else None
    row["widths"] = " ".join(str(w) for w in ev.get("widths", []))
    return row


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS with the latency/throughput columns of the measured batch sizes after the accuracy."""
    timed = sorted({k for r in rows for k in r if k.startswith(("latency_ms_b", "throughput_b"))},
                   key=lambda k: (int(k.rsplit("_b", 1)[1]), k.startswith("throughput")))
    i = COLUMNS.index("latency_device")
    return COLUMNS[:i] + timed + COLUMNS[i:]


def _fmt(key: str, value) -> str:
    if value is None or value == "":
        return ""
    if key in ("target_macs", "macs", "macs_ptflops", "params"):
        v = float(value)
        return f"{v / 1e9:.3f}G" if v >= 1e9 else f"{v / 1e6:.3f}M" if v >= 1e6 else f"{v / 1e3:.1f}K"
    if key in ("top1", "top5"):
        return f"{float(value):.2f}"
    if key.startswith("latency_ms"):
        return f"{float(value):.3f}"
    if key.startswith("throughput") or key.endswith("_s"):
        return f"{float(value):.0f}"
    return str(value)


def _display_columns(cols: list[str], rows: list[dict]) -> dict[str, str]:
    """The shown columns and their headings; `seed` only when the rows come from several seeds."""
    shown = dict(DISPLAY)
    if len({r.get("seed") for r in rows}) < 2:
        del shown["seed"]
    for c in cols:
        if c.startswith("latency_ms_b"):
            shown[c] = f"ms b{c.rsplit('_b', 1)[1]}"
        elif c.startswith("throughput_b"):
            shown[c] = f"img/s b{c.rsplit('_b', 1)[1]}"
    shown.update({"search_s": "search s", "finetune_s": "fine-tune s", "train_s": "train s"})
    return {c: shown[c] for c in cols if c in shown}


def to_csv(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in cols} for r in rows)
    return buf.getvalue()


def to_markdown(rows: list[dict], cols: list[str], device: str) -> str:
    shown = _display_columns(cols, rows)
    lines = [f"Latency in ms and throughput in images/s measured on {device}.", "",
             "| " + " | ".join(shown.values()) + " |",
             "|" + "|".join("---" if c in ("model", "method", "backbone") else "---:" for c in shown) + "|"]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def tex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


def to_latex(rows: list[dict], cols: list[str], device: str) -> str:
    shown = _display_columns(cols, rows)
    align = "".join("l" if c in ("model", "method", "backbone") else "r" for c in shown)
    lines = [f"% Latency in ms and throughput in images/s measured on {device}.",
             f"\\begin{{tabular}}{{{align}}}", "\\hline",
             " & ".join(tex_escape(h) for h in shown.values()) + " \\\\", "\\hline"]
    lines += [" & ".join(tex_escape(_fmt(c, r.get(c))) for c in shown) + " \\\\" for r in rows]
    lines += ["\\hline", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out_dir: str | Path, stem: str = "main") -> list[Path]:
    """out_dir/stem.csv, .md and .tex, each written atomically."""
    if not rows:
        raise PasError("no rows to tabulate")
    out_dir = Path(out_dir)
    cols = columns(rows)
    devices = sorted({r["latency_device"] for r in rows})
    device = " and ".join(devices)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("csv", "md", "tex")]
    for path, text in zip(paths, (to_csv(rows, cols), to_markdown(rows, cols, device), to_latex(rows, cols, device))):
        atomic_write_text(path, text)
    return paths


def read_table(path: str | Path) -> list[dict]:
    """The CSV back as rows, numbers as floats, empty cells as None."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("model", "method", "backbone", "latency_device", "widths"):
                continue
            if k == "seed":
                r[k] = int(v) if v not in ("", None) else None
                continue
            r[k] = float(v) if v not in ("", None) else None
        r["widths"] = [int(w) for w in (r.get("widths") or "").split()]
    return rows


def main(args) -> int:
    rows = [table_row(parse_row_spec(text)) for text in args.row]
    for path in write_tables(rows, args.out_dir, args.stem):
        print(path)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("tables", help="results table (CSV, Markdown, LaTeX) from evaluate/search/finetune JSONs")
    p.add_argument("--row", action="append", required=True, metavar="eval=PATH[,masks=PATH,...]",
                   help=f"the files of one network; keys: {', '.join(ROW_KEYS)} (repeat per row)")
    p.add_argument("--out-dir", required=True, help="writes STEM.csv, STEM.md and STEM.tex here")
    p.add_argument("--stem", default="main", help="file name stem (default: main)")
    p.set_defaults(func=main)
