"""`pas latency`: networks timed alternately in one process, with PyTorch and ONNX Runtime.

The timing harness is checked against a scripted clock (hand-computed medians, and a machine that
slows down during the measurement), and against sleeps of known length; what ONNX Runtime times is
checked to compute what the compact PyTorch network computes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pas.compact import compact
from pas.deploy import save_deployed
from pas.errors import PasError
from pas.gates import set_masks
from pas.latency import Case, _onnx_call, cases_for, time_alternately
from pas.models import build

PAS = [sys.executable, "-m", "pas.cli"]


class ScriptedClock:
    """A clock that a call advances by its own cost times the machine's slowdown at that moment."""

    def __init__(self, slowdown_per_call: float = 0.0):
        self.now = 0.0
        self.calls = 0
        self.slowdown_per_call = slowdown_per_call
        self.order: list[str] = []

    def __call__(self) -> float:
        return self.now

    def work(self, name: str, seconds: float):
        def run():
            self.order.append(name)
            self.now += seconds * (1 + self.slowdown_per_call * self.calls)
            self.calls += 1
        return run


def test_rounds_rotate_and_the_median_is_per_network():
    clock = ScriptedClock()
    cases = [Case(n, "pytorch", "cpu", 1, clock.work(n, s)) for n, s in (("a", 0.001), ("b", 0.002), ("c", 0.004))]
    rows = time_alternately(cases, rounds=4, warmup=1, clock=clock)
    # every round runs each network once, starting one further along each round
    assert clock.order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    assert [round(r["latency_ms"], 9) for r in rows] == [1.0, 2.0, 4.0]
    assert [r["iqr_ms"] for r in rows] == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert rows[1]["throughput"] == pytest.approx(500.0)


def test_a_machine_slowing_down_reaches_every_network_alike():
    """Two identical networks on a machine that gets 1% slower with every call: timed alternately
    their medians differ by less than 2%; timed one after the other (as separate jobs would) the
    second looks ~10% slower (by hand: the medians of 10 ms x (1 + 0.01 k) over calls k = 0..9 and 10..19, 10.45 and 11.45 ms)."""
    clock = ScriptedClock(slowdown_per_call=0.01)
    same = [Case(n, "pytorch", "cpu", 1, clock.work(n, 0.010)) for n in ("first", "second")]
    a, b = time_alternately(same, rounds=10, warmup=0, clock=clock)
    assert abs(b["latency_ms"] / a["latency_ms"] - 1) < 0.02
    clock = ScriptedClock(slowdown_per_call=0.01)
    alone = [time_alternately([Case(n, "pytorch", "cpu", 1, clock.work(n, 0.010))], rounds=10, warmup=0,
                              clock=clock)[0] for n in ("first", "second")]
    assert [a["latency_ms"] for a in alone] == pytest.approx([10.45, 11.45])


def test_sleeps_of_known_length_are_measured_as_such():
    cases = [Case(f"{ms}ms", "pytorch", "cpu", 1, lambda ms=ms: time.sleep(ms / 1000)) for ms in (10, 30)]
    short, long = time_alternately(cases, rounds=5, warmup=1)
    assert 10 <= short["latency_ms"] < 16 and 30 <= long["latency_ms"] < 38


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    torch.manual_seed(0)
    model = build("repvgg_a0_mini", num_classes=10, in_channels=1, resolution=28).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    widths = model.arch.searchable_widths()
    set_masks(model, [torch.arange(w) < max(1, w // 2) for w in widths])
    plain = compact(model).eval()
    folder = tmp_path_factory.mktemp("deployed") / "net"
    save_deployed(plain, folder)
    return plain, folder


def test_onnx_runtime_times_what_the_compact_network_computes(deployed):
    plain, folder = deployed
    x = torch.randn(4, 1, 28, 28)
    import onnxruntime as ort
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ours = plain(x).numpy()
    assert np.abs(theirs - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())
    assert _onnx_call(folder / "model.onnx", x.numpy(), "cpu", 1)()[0].shape == (4, 10)
    kinds = {(c.runtime, c.device, c.batch) for c in cases_for("n", folder, batch_sizes=[1, 3])}
    assert kinds == {(r, "cpu", b) for r in ("pytorch", "onnxruntime") for b in (1, 3)}


def test_cli_writes_one_json_with_the_machine(deployed, tmp_path):
    _, folder = deployed
    out = tmp_path / "latency.json"
    subprocess.run([*PAS, "latency", "--model", f"A={folder}", "--model", f"B={folder}", "--batch-sizes", "1", "2",
                    "--rounds", "3", "--warmup", "1", "--threads", "1", "--out", str(out)], check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert result["machine"]["threads"] == 1 and result["rounds"] == 3
    assert sorted((r["model"], r["runtime"], r["batch"]) for r in result["rows"]) == sorted(
        (m, rt, b) for m in "AB" for rt in ("pytorch", "onnxruntime") for b in (1, 2))


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(PasError, match=r"has no arch.json; expected the folder pas deploy wrote"):
        cases_for("n", tmp_path, batch_sizes=[1])
    with pytest.raises(PasError, match=r"latency rounds 1: expected at least 2"):
        time_alternately([], rounds=1, warmup=0)
    bad = subprocess.run([*PAS, "latency", "--model", "no-folder", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == ("pas: error: --model 'no-folder': expected "
                                                          "NAME=DEPLOYED_FOLDER")
    assert not (tmp_path / "x.json").exists()


def test_pruning_efficiency_and_its_ceiling_by_hand():
    """benchmarks/pruning_efficiency: 10 ms full, 5 ms pruned at a quarter of 4 M MACs: 2x faster for
    4x fewer MACs, efficiency 0.5; if the narrowest widths run in 4 ms, no network of 1 M MACs gets
    above 2.5x / 4 = 0.625."""
    from benchmarks.pruning_efficiency import ceiling, efficiency
    assert efficiency(10.0, 5.0, 4_000_000, 1_000_000) == pytest.approx(0.5)
    assert ceiling(10.0, 4.0, 4_000_000, 1_000_000) == pytest.approx(0.625)


def test_pruning_efficiency_times_the_narrowest_allowed_widths(tmp_path, capsys):
    """The ceiling's network is the backbone at the least its channel multiple allows: repvgg_b0_mini
    on multiples of 8 is 8 channels everywhere. By hand, at 28 px: the stem 1->8 at 14x14
    (9*1*8*196 = 14,112), two 8->8 blocks at 14x14 (2 * 9*8*8*196 = 225,792), two at 7x7 (56,448),
    four at 4x4 (36,864), one at 2x2 (2,304) and the classifier 8->10 (80): 335,600 MACs."""
    from benchmarks.pruning_efficiency import main
    masks = tmp_path / "masks.json"
    masks.write_text(json.dumps({"backbone": "repvgg_b0_mini", "widths": [8, 8, 8, 8, 8, 32, 16, 16, 8, 160],
                                 "channel_multiple": 8}))
    rows = main(["--masks", f"PaS-A={masks}", "--batches", "2", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "the narrowest allowed widths (335,600 MACs, x8)" in out
    assert [r["benchmark"] for r in rows] == ["pruning efficiency PaS-A (batch 2)"]
    assert rows[0]["goal"] == "-"  # batch 2: reported, not held to the goal


FAULTS = """
import resource, torch
from pas.latency import keep_freed_memory
from pas.latency_table import _compact_at
from pas.models import build
torch.set_num_threads(1)
m = build("mobilenetv2_mini_035", num_classes=10, in_channels=1, resolution=28).eval()
nets = [_compact_at(m, m.arch.full_widths()), _compact_at(m, [8] * 8)]
x = torch.randn(64, 1, 28, 28)
def faults_per_pass():  # in the steady state: the fewest of three windows of 5 rounds
    windows = []
    with torch.no_grad():
        for _ in range(3):
            for n in nets:
                n(x)
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                for n in nets:
                    n(x)
            windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    return min(windows)
print(faults_per_pass())
print(keep_freed_memory())
print(faults_per_pass())
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_timed_passes_do_not_page_fault_their_activations_in_again():
    """The kernel's count of minor page faults (getrusage) is the oracle. Two networks run in turn
    at batch 64, as they are timed: with glibc's defaults every pass hands its activations back to
    the system and faults them in again (thousands of faults per pass); once the timing harness has
    set the allocator up, none. Each count is the fewest of three windows of 5 rounds (the heap may
    still grow once in a while after the setting: 20-60 faults per pass in one window of about one
    in eight). A fresh process: the setting is process-wide."""
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout.split("\n")
    default, allocator, kept = float(out[0]), out[1], float(out[2])
    assert default > 500, out
    assert kept < 5, out
    assert "freed memory kept" in allocator


def test_the_measurement_records_the_allocator(deployed):
    from pas.latency import measure
    result = measure({"net": deployed[1]}, batch_sizes=[1], rounds=2, warmup=0, runtimes=["pytorch"])
    libc = __import__("platform").libc_ver()[0]
    assert ("freed memory kept" in result["machine"]["allocator"]) == (libc == "glibc"), result["machine"]
