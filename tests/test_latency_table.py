"""Latency tables and the search to a latency budget: the table's prediction against scipy's
interpolation of the same grid and against finite differences, the landing of PaS and the baselines
on the predicted budget, the traced geometry against the tensors a forward pass really sees, and bad
input. (How well a table predicts a measured network is a property of the machine, not of the
code: `benchmarks/latency_table.py` measures it.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn

from pas import models as M
from pas.cli import main as pas_main
from pas.errors import PasError
from pas.graph.network import describe
from pas.latency_table import (LatencyTable, TABLE_FORMAT, fit_calibration, measure_table, plan, random_widths,
                                timed_layers)
from pas.landing import WidthRule
from pas.pruners import run_pruner
from pas.search import latency_target, resolve_budget, search

SMALL = dict(num_classes=10, in_channels=1, resolution=28)


def synthetic_table(arch, *, points=4, seed=0, scale=1.25, rest=0.5) -> LatencyTable:
    """A table of `arch` with random latencies that grow with both widths (no timing)."""
    entries, of_layer = plan(arch, points=points)
    g = torch.Generator().manual_seed(seed)
    for e in entries:
        steps = torch.rand(len(e["in_widths"]), len(e["out_widths"]), generator=g, dtype=torch.float64)
        e["latency_ms"] = steps.cumsum(0).cumsum(1).tolist()  # increasing along both axes
    layers = [{"module": layer.module, "entry": i, "kind": layer.kind, "in_channels": layer.in_channels,
               "out_channels": layer.out_channels} for layer, i in zip(timed_layers(arch), of_layer)]
    return LatencyTable({"format": TABLE_FORMAT, "backbone": arch.backbone, "resolution": arch.resolution,
                         "runtime": "pytorch", "device": "cpu", "batch": 1, "threads": 1, "entries": entries,
                         "layers": layers, "scale": scale, "rest_ms": rest}, "synthetic")


def oracle(table: LatencyTable, widths: list[int], in_channels: int, classes: int) -> float:
    """The prediction for a plain chain (RepVGG: layer i reads group i-1 and writes group i, the
    classifier writes the classes), each layer's grid interpolated by scipy, monotone by numpy,
    weighted by the layer's fitted factor, plus the table's constant."""
    ins, outs = [in_channels, *widths], [*widths, classes]
    total = 0.0
    for layer, c_in, c_out in zip(table.data["layers"], ins, outs):
        e = table.data["entries"][layer["entry"]]
        z = np.maximum.accumulate(np.maximum.accumulate(np.array(e["latency_ms"], float), 0), 1)
        xs, ys = np.array(e["in_widths"], float), np.array(e["out_widths"], float)
        if len(xs) == 1:
            xs, z = np.array([xs[0], xs[0] + 1]), np.vstack([z, z])
        if len(ys) == 1:
            ys, z = np.array([ys[0], ys[0] + 1]), np.hstack([z, z])
        f = RegularGridInterpolator((xs, ys), z, method="linear", bounds_error=False, fill_value=None)
        total += layer.get("scale", 1.0) * float(f([[c_in, c_out]])[0])  # a fitted table's layer factor
    return table.scale * total + table.rest_ms


def test_the_prediction_is_scipys_bilinear_interpolation_of_the_grid():
    model = M.build("repvgg_b0_mini", **SMALL)
    arch = model.arch
    table = synthetic_table(arch)
    rng = np.random.default_rng(0)
    for _ in range(20):
        widths = [int(rng.integers(1, f + 1)) for f in arch.full_widths()]
        assert table.predict(arch, widths) == pytest.approx(oracle(table, widths, 1, 10), rel=1e-12)
    # a grid point is the measured value itself: the full network is every layer's last corner
    full = sum(table.data["entries"][r["entry"]]["latency_ms"][-1][-1] for r in table.data["layers"])
    assert table.predict(arch, arch.full_widths()) == pytest.approx(1.25 * full + 0.5)


def test_a_measured_dip_is_flattened_so_more_channels_are_never_predicted_faster():
    """A 2x2 grid with a dip: [[1.0, 0.5], [0.8, 2.0]] (rows: input widths 4, 8; columns: output
    widths 4, 8) is used as its running maximum [[1.0, 1.0], [1.0, 2.0]]."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 2, 1))
    arch = describe(net, (3, 8, 8))
    entries, of_layer = plan(arch, points=2, channel_multiple=4)
    assert [(e["in_widths"], e["out_widths"]) for e in entries] == [([3], [4, 8]), ([4, 8], [4, 8]), ([4, 8], [2])]
    for e in entries:
        e["latency_ms"] = [[0.0] * len(e["out_widths"]) for _ in e["in_widths"]]
    entries[1]["latency_ms"] = [[1.0, 0.5], [0.8, 2.0]]
    layers = [{"module": layer.module, "entry": i, "kind": layer.kind, "in_channels": layer.in_channels,
               "out_channels": layer.out_channels} for layer, i in zip(timed_layers(arch), of_layer)]
    table = LatencyTable({"format": TABLE_FORMAT, "entries": entries, "layers": layers, "scale": 1.0,
                          "rest_ms": 0.0})
    assert [table.predict(arch, w) for w in ([4, 4], [4, 8], [8, 4], [8, 8], [6, 6])] == \
        pytest.approx([1.0, 1.0, 1.0, 2.0, 1.25])


def test_the_predictions_gradient_is_the_finite_difference():
    """Through every layer, at widths between grid points (the interpolation is smooth there)."""
    model = M.build("mobilenetv2_mini_035", **SMALL)
    arch = model.arch
    table = synthetic_table(arch, points=5)
    rng = np.random.default_rng(1)
    widths = [torch.tensor(float(rng.uniform(1.2, f - 0.2)), dtype=torch.float64, requires_grad=True)
              for f in arch.full_widths()]
    assert torch.autograd.gradcheck(lambda *w: table.predict(arch, list(w)), widths, eps=1e-4, atol=1e-6)
    # "output": every layer's input width detached; the gradient is smaller wherever a layer reads it
    both = torch.autograd.grad(table.predict(arch, widths), widths)
    output = torch.autograd.grad(table.predict(arch, widths, input_grad=False), widths)
    assert all(o <= b + 1e-12 for o, b in zip(output, both)) and any(o < b for o, b in zip(output, both))


def test_pas_and_every_baseline_land_on_the_predicted_budget():
    """The landed widths' latency as scipy interpolates the table: within 2% under the target."""
    torch.manual_seed(0)
    model = M.build("repvgg_b0_mini", **SMALL)
    arch = model.arch
    table = synthetic_table(arch, points=6, seed=3)
    full = oracle(table, arch.full_widths(), 1, 10)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    result = search(model, [(x, y)] * 3, target="60% latency", epochs=1, latency_table=table, tolerance=0.02)
    got = oracle(table, [int(m.sum()) for m in result.masks], 1, 10)
    assert 0.98 * 0.6 * full <= got <= 0.6 * full
    assert result.target_macs is None and result.landing.predicted_ms == pytest.approx(got)
    fresh = M.build("repvgg_b0_mini", **SMALL)
    budget = resolve_budget("60% latency", fresh.arch, latency_table=table)
    for method in ("uniform", "bn_gamma", "l1"):
        landing = run_pruner(method, fresh, budget.target, cost=budget.cost(fresh.arch), tolerance=0.02)
        got = oracle(table, [int(m.sum()) for m in landing.masks], 1, 10)
        assert 0.98 * 0.6 * full <= got <= 0.6 * full, method


def test_the_latency_penalty_is_scaled_by_the_range_the_widths_control():
    """At full width: alpha * ((T_full - target) / (T_full - T_narrowest))^2, each T by scipy."""
    from pas.gates import attach_gates
    from pas.landing import WidthRule
    from pas.search import LatencyPenalty
    model = M.build("repvgg_b0_mini", **SMALL)
    arch = model.arch
    table = synthetic_table(arch, seed=5)
    attach_gates(model)
    budget = resolve_budget("50ms", arch, latency_table=table)
    full, lowest = oracle(table, arch.full_widths(), 1, 10), oracle(table, WidthRule(arch).minimum(), 1, 10)
    penalty, macs = LatencyPenalty(arch, budget, alpha=14.0)(model)
    assert float(penalty.detach()) == pytest.approx(14.0 * ((full - 50) / (full - lowest)) ** 2)
    assert float(macs.detach()) == arch.macs()


def test_the_traced_geometry_is_what_the_forward_pass_sees():
    """Input side, stride and the activation after each conv, against hooks on a real forward pass
    of torchvision's ResNet-18 (stride, padding from the modules; activation from the hook order)."""
    import torchvision
    net = torchvision.models.resnet18(num_classes=10).eval()
    arch = describe(net, (3, 64, 64))
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = tuple(inputs[0].shape)
        return record
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(hook(name))
    net(torch.randn(1, 3, 64, 64))
    for layer in timed_layers(arch):
        shape = seen[layer.module]
        if layer.kind == "linear":
            assert shape == (1, layer.in_channels)
        else:
            module = net.get_submodule(layer.module)
            assert (shape[2], shape[3]) == layer.in_hw and layer.stride == module.stride
    acts = {layer.module: layer.act for layer in timed_layers(arch)}
    # conv1 and each block's first conv end in a ReLU; the second conv's output is added first
    assert acts["conv1"] == acts["layer1.0.conv1"] == "ReLU"
    assert acts["layer1.0.conv2"] is None and acts["layer2.0.downsample.0"] is None and acts["fc"] is None


def test_a_table_is_measured_once_per_distinct_layer(tmp_path):
    """repvgg_b0_mini at 28 px has 11 timed layers and 8 distinct ones: the stem, blocks 1-2 (8->8 at
    14 px), 3, 4, 5, blocks 6-8 (32->32 at 4 px), 9 and the classifier. The CLI writes the JSON and
    one CSV row per measured point (a dense layer points^2, a fixed axis once)."""
    assert pas_main(["latency-table", "--backbone", "repvgg_b0_mini", "--resolution", "28", "--num-classes", "10",
                     "--in-channels", "1", "--points", "2", "--rounds", "2", "--warmup", "0", "--check", "0.5",
                     "--runtime", "onnxruntime", "--networks", "3", "--out", str(tmp_path / "t.json"), "--csv",
                     str(tmp_path / "t.csv")]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["calibration"]["method"] == "networks" and len(data["calibration"]["fit"]) == 2 + 3 + 3
    assert all(r["scale"] >= 0 for r in data["layers"]) and data["scale"] == 1.0
    assert len(data["layers"]) == 11 and len(data["entries"]) == 8
    assert [r["entry"] for r in data["layers"]] == [0, 1, 1, 2, 3, 4, 5, 5, 5, 6, 7]
    assert (tmp_path / "t.csv").read_text().count("\n") == 1 + 2 + 6 * 4 + 2
    assert data["runtime"] == "onnxruntime" and data["machine"]["threads"] == 1
    assert [c["scale"] for c in data["check"]] == [0.5, None, None, None, None]
    LatencyTable.load(tmp_path / "t.json").check_network(M.build("repvgg_b0_mini", **SMALL).arch)


def test_the_calibration_recovers_known_layer_factors():
    """Network latencies made from a table with known per-layer factors and a constant: the fit
    (no pull towards the prior) recovers them, and the table it describes predicts a network it
    was not fitted to exactly. A factor the data would make negative is held at 0 instead, so more
    channels are never predicted faster."""
    arch = M.build("repvgg_b0_mini", **SMALL).arch
    table = synthetic_table(arch, scale=1.0, rest=0.0)
    rule = WidthRule(arch)
    widths = [arch.full_widths(), *random_widths(arch, rule, 40)]
    terms = [table.layer_terms(arch, w) for w in widths]
    truth = np.random.default_rng(0).uniform(0.5, 2.0, len(terms[0]))
    measured = [float(np.dot(t, truth)) + 0.3 for t in terms]
    factors, rest, error, _ = fit_calibration(terms, measured, terms[0], measured[0], prior=1.0, ridge=0.0)
    assert factors == pytest.approx(truth.tolist(), rel=1e-6) and rest == pytest.approx(0.3, rel=1e-6)
    assert error < 1e-9
    for row, factor in zip(table.data["layers"], factors):
        row["scale"] = factor
    fitted = LatencyTable({**table.data, "rest_ms": rest})
    held_out = random_widths(arch, rule, 1, seed=7)[0]
    expected = float(np.dot(table.layer_terms(arch, held_out), truth)) + 0.3
    assert fitted.predict(arch, held_out) == pytest.approx(expected, rel=1e-6)
    truth[3] = -0.5  # data that "wants" a negative factor
    measured = [float(np.dot(t, truth)) + 0.3 for t in terms]
    factors, _, _, _ = fit_calibration(terms, measured, terms[0], measured[0], prior=1.0, ridge=0.0)
    assert min(factors) >= 0 and factors[3] == 0


def test_the_calibration_falls_back_on_the_prior_without_data():
    """With only the full network measured, a strong pull leaves every factor at the prior scale
    and the constant makes up the rest of the full network's latency."""
    arch = M.build("repvgg_b0_mini", **SMALL).arch
    table = synthetic_table(arch, scale=1.0, rest=0.0)
    full = table.layer_terms(arch, arch.full_widths())
    factors, rest, _, _ = fit_calibration([full], [1.5 * sum(full) + 0.2], full, 1.5 * sum(full) + 0.2, prior=1.5,
                                          ridge=1e6)
    assert factors == pytest.approx([1.5] * len(full), rel=1e-4) and rest == pytest.approx(0.2, rel=1e-3)


def test_without_a_prior_the_calibration_pulls_towards_the_best_common_scale():
    """Networks whose latency is 1.7 x the layers' sum + 0.3 ms: the prior found is 1.7, and a strong
    pull leaves every factor there and the constant at 0.3."""
    arch = M.build("repvgg_b0_mini", **SMALL).arch
    table = synthetic_table(arch, scale=1.0, rest=0.0)
    terms = [table.layer_terms(arch, w) for w in [arch.full_widths(), *random_widths(arch, WidthRule(arch), 12)]]
    measured = [1.7 * sum(t) + 0.3 for t in terms]
    factors, rest, error, prior = fit_calibration(terms, measured, terms[0], measured[0], ridge=1e6)
    assert prior == pytest.approx(1.7, rel=1e-6) and rest == pytest.approx(0.3, rel=1e-4)
    assert factors == pytest.approx([1.7] * len(terms[0]), rel=1e-5) and error < 1e-5


def test_latency_targets_are_parsed():
    assert latency_target("3.5ms") == (3.5, "ms") and latency_target("800us") == (pytest.approx(0.8), "ms")
    assert latency_target("0.02 s") == (20.0, "ms") and latency_target("70% latency") == (70.0, "%")
    assert latency_target("70%") is None and latency_target("1.36G") is None and latency_target(0.5) is None


def test_bad_latency_input_gets_a_one_line_error(tmp_path):
    model = M.build("repvgg_b0_mini", **SMALL)
    other = M.build("mobilenetv2_mini_035", **SMALL)
    table = synthetic_table(model.arch)
    with pytest.raises(PasError, match=r"target '3ms' is a latency; expected search.latency_table"):
        resolve_budget("3ms", model.arch)
    with pytest.raises(PasError, match=r"measured for repvgg_b0_mini at 28 px; this network is mobilenetv2_mini_035"):
        resolve_budget("50% latency", other.arch, latency_table=table)
    with pytest.raises(PasError, match=r"target '1000ms' = 1000 ms is outside the range .* expected between"):
        resolve_budget("1000ms", model.arch, latency_table=table)
    (tmp_path / "bad.json").write_text('{"format": "pas-latency-table/1"}')
    with pytest.raises(PasError, match=r"latency table .*bad.json' is malformed \(KeyError: 'entries'\)"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(PasError, match=r"latency table .*missing.json' does not exist"):
        LatencyTable.load(tmp_path / "missing.json")
    with pytest.raises(PasError, match=r"points 1: expected an integer >= 2"):
        plan(model.arch, points=1)
    with pytest.raises(PasError, match=r"device 'cuda' is not available to pytorch here"):
        measure_table(model, runtime="pytorch", device="cuda")
    with pytest.raises(PasError, match=r"networks -1: expected an integer >= 0"):
        measure_table(model, runtime="pytorch", networks=-1)
