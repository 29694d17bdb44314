"""Screenshot of the MLflow UI over a run's store: the parent runs of one target (PaS and its
baselines) in the UI's chart view of their evaluation metrics, for the README.

    python docs/mlflow_screenshot.py results/mlflow.db --target 50% --out docs/mlflow_ui.png

Starts `mlflow server` on a free local port, opens the experiment's run list filtered by the target
in headless Chromium, writes the PNG, and stops the server however the script ends.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            return
        except OSError:
            if server.poll() is not None:
                sys.exit(f"mlflow server exited with {server.returncode}")
            if time.monotonic() > deadline:
                sys.exit(f"mlflow server not up after {timeout:.0f} s")
            time.sleep(0.5)


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def parent_runs(base: str, experiment: str, target: str) -> tuple[str, list[str]]:
    """The experiment's id and its parent runs (one per network and seed) at the target."""
    exp = api(base, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")["experiment"]
    query = f"tags.target = '{target}' and tags.pas_parent LIKE '%'"
    runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": query,
                                                     "max_results": 50})
    ids = [r["info"]["run_id"] for r in runs.get("runs", [])]
    if not ids:
        sys.exit(f"no parent runs with target {target!r} in experiment {experiment!r}")
    return exp["experiment_id"], ids


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="the SQLite store (results/mlflow.db)")
    p.add_argument("--experiment", default="pas")
    p.add_argument("--target", default="50%", help="show the runs with this target tag")
    p.add_argument("--out", default="docs/mlflow_ui.png")
    p.add_argument("--size", default="1800,1100", help="window width,height in pixels")
    p.add_argument("--keep-width", type=int, default=1340,
                   help="pixels kept from the left (the UI's assistant panel takes the right ~460)")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("no Chromium found: apt-get install chromium")
    store = Path(args.store).resolve()
    if not store.is_file():
        sys.exit(f"store {str(store)!r} does not exist; expected results/mlflow.db of a finished run")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(base, server)
        exp, runs = parent_runs(base, args.experiment, args.target)
        query = urllib.parse.quote(f"tags.target = '{args.target}' and tags.pas_parent LIKE '%'")
        url = (f"{base}/#/experiments/{exp}/runs?searchFilter={query}&compareRunsMode=CHART"
               f"&orderByKey=metrics.%60top1%60&orderByAsc=false")
        del runs
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={args.size}",
                            "--virtual-time-budget=20000", f"--screenshot={out}", url],
                           check=True, capture_output=True, timeout=180)
        from PIL import Image
        with Image.open(out) as shot:
            cropped = shot.crop((0, 0, min(args.keep_width, shot.width), shot.height))
        cropped.save(out)
        print(out)
    finally:
        try:
            os.killpg(server.pid, signal.SIGINT)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
