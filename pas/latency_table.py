"""Latency tables: the measured latency of every searchable layer over a grid of its widths, and the
latency of the network at any widths predicted from them, differentiable through the widths.

What is timed. Every conv (dense, grouped, depth-wise or transposed) and linear layer of the traced
network as deployed: the layer with its bias (a BN folded in) and the activation after it
(`Layer.act`), on an input of its own side, at the table's batch size, with the table's runtime
(PyTorch or ONNX Runtime), device and thread count. Layers of equal geometry (kind, kernel, stride,
padding, dilation, output padding, sides, groups, activation, width ranges) share one set of
measurements: a RepVGG stage's repeated layers are measured once. The points of one layer are timed
alternately (`pas.latency.time_alternately`).

The grid. A layer's input width ranges over the widths the layers it reads may keep (their allowed
widths under `channel_multiple`, `pas.landing.WidthRule`), from the narrowest to the full width, and
its output width likewise. `points` values per axis (default 6) spread evenly over that range and
moved to allowed widths: a dense layer costs points^2 measurements, a depth-wise one `points`, a
fixed axis (the network's input, the classifier's output) one. Between grid points the latency is
interpolated bilinearly (linearly along a single axis); outside, it is extrapolated from the last
cell. Before interpolation the grid is made non-decreasing along both axes (a running maximum): a
layer with more channels is never predicted faster, which the landing's fill step relies on. A
measured dip (an aligned width beating a narrower unaligned one) is therefore not modelled: align
the widths with channel_multiple instead.

Calibration on whole networks. Layers timed one by one do not add up to the network: inside it a
layer runs with other caches and without its own call overhead, by a factor that differs from layer
to layer (`benchmarks/layers_in_network.py`), and some cost lies outside every layer (pooling,
residual additions, the network's own call). So the prediction is `sum_l a_l * T_l(widths) + rest`,
`T_l` the layer's interpolated grid, and its parameters are fitted to measured networks: the full
network, every width at 1/8, 3/8, 5/8 and 7/8, and `networks` networks of random widths (each searched width uniform
between 20% and 100% of its full width, on the allowed widths; default two per timed layer plus
eight), all timed alternately in one loop. The fit is least squares on the relative error, each
`a_l >= 0` (so more channels are never predicted slower than fewer) and pulled towards the one
scale that fits all those networks best (`ridge`, default 10, in units of one network's squared
relative error per layer's share of the full network): a layer's factor leaves the common scale
only as far as the networks show it does. `networks=0` keeps the two-point calibration (one scale
for every layer, from the full and the 1/8 network alone). The table then checks itself on networks it was not fitted
to, timed in the same loop: the compact network at uniform width scales (`check`, default 0.25,
0.5 and 0.75 of every searched width, on the allowed widths) and `check_random` (default 4) more
random networks; their prediction errors are recorded, and `pas latency-table` prints them.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pas.errors import PasError
from pas.graph.channels import Layer
from pas.graph.network import Network
from pas.landing import WidthRule

TABLE_FORMAT = "pas-latency-table/1"
TIMED_KINDS = ("conv", "grouped", "depthwise", "transposed", "linear")
DEFAULT_POINTS = 6
DEFAULT_CHECK = (0.25, 0.5, 0.75)
DEFAULT_CHECK_RANDOM = 4
CHECK_SEED = 20222
CALIBRATION_SCALE = 0.125
FIT_SCALES = (0.375, 0.625, 0.875)  # uniform networks the fit adds to the full, the 1/8 and the random ones
RIDGE = 10.0
FIT_SEED = 20221  # the fit's random networks (not those the table or a benchmark checks with)


def default_networks(arch: Network) -> int:
    """Random networks the calibration fits to by default: two per timed layer, plus eight."""
    return 2 * len(timed_layers(arch)) + 8


def random_widths(arch: Network, rule: WidthRule, count: int, seed: int = FIT_SEED) -> list[list[int]]:
    """`count` random width settings: every searched width uniform in 20-100% of its full width, on
    the allowed widths."""
    import random
    rng = random.Random(seed)
    return [rule.nearest(max(1, round(rng.uniform(0.2, 1.0) * f)) for f in arch.full_widths())
            for _ in range(count)]


def fit_calibration(terms: list[list[float]], measured: list[float], full_terms: list[float], full_ms: float,
                    prior: float | None = None, ridge: float = RIDGE) -> tuple[list[float], float, float, float]:
    """Per-layer factors `a_l >= 0` and a constant `rest` with `sum_l a_l * terms[n][l] + rest` close to
    `measured[n]` in relative error (non-negative least squares), each factor pulled towards `prior`
    with weight `ridge * (its layer's share of the full network)^2`. Without a prior, the one scale
    that fits every network best (with its own constant) is the prior. Returns the factors, the
    rest, the median absolute relative error of the fit on its own networks and the prior."""
    import numpy as np
    from scipy.optimize import nnls
    t = np.asarray(terms, dtype=float)
    y = np.asarray(measured, dtype=float)
    if t.ndim != 2 or len(t) != len(y) or len(t) == 0 or (y <= 0).any():
        raise PasError(f"latency calibration: {len(t)} networks with {len(y)} positive latencies; expected as many "
                       f"of each, at least one")
    n_layers = t.shape[1]
    w = 1.0 / y  # relative error
    rest_columns = np.stack([w, -w], 1)  # rest = rest+ - rest-, both >= 0: a constant of either sign
    if prior is None:
        one, _ = nnls(np.hstack([(t.sum(1) * w)[:, None], rest_columns]), np.ones(len(y)))
        prior = float(one[0])
    a = np.hstack([t * w[:, None], rest_columns])
    share = np.sqrt(ridge) * np.asarray(full_terms, dtype=float) / full_ms
    prior_rows = np.hstack([np.diag(share), np.zeros((n_layers, 2))])
    solution, _ = nnls(np.vstack([a, prior_rows]), np.concatenate([np.ones(len(y)), share * prior]),
                       maxiter=50 * (n_layers + 2))
    factors, rest = solution[:n_layers], solution[n_layers] - solution[n_layers + 1]
    error = float(np.median(np.abs((t @ factors + rest) / y - 1)))
    return [float(f) for f in factors], float(rest), error, prior


# -- the grid ---------------------------------------------------------------------------------------
def _axis_values(arch: Network, rule: WidthRule, layout, points: int, step: int) -> list[int]:
    """The grid of one axis: `points` widths from the narrowest to the full width of `layout`."""
    g = arch.graph
    searched = {gi: i for i, gi in enumerate(arch.searched)}
    parts = [rule.allowed[searched[g.space_group[s]]] if g.space_group[s] in searched else [g.space_size[s]]
             for s in layout]
    lo, hi = sum(p[0] for p in parts), sum(p[-1] for p in parts)
    if len(parts) == 1:
        candidates = parts[0]
    else:  # a concatenation: any sum of its parts' widths, on the step
        candidates = sorted({lo, hi} | set(range(math.ceil(lo / step) * step, hi + 1, step)))
    if lo == hi:
        return [hi]
    wanted = [lo + (hi - lo) * k / (points - 1) for k in range(points)]
    return sorted({min(candidates, key=lambda c: (abs(c - w), -c)) for w in wanted})


def _geometry(layer: Layer) -> dict:
    return {"kind": layer.kind, "kernel": list(layer.kernel), "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation), "output_padding": list(layer.output_padding),
            "groups": layer.groups, "in_hw": list(layer.in_hw), "out_hw": list(layer.out_hw),
            "factor": layer.factor, "act": layer.act, "bias": bool(layer.bias or layer.bn)}


def timed_layers(arch: Network) -> list[Layer]:
    return [layer for layer in arch.graph.layers if layer.kind in TIMED_KINDS]


def plan(arch: Network, *, channel_multiple: int = 1, points: int = DEFAULT_POINTS) -> tuple[list[dict], list[int]]:
    """The entries to measure (geometry + grid, shared by equal layers) and each timed layer's entry."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise PasError(f"latency table points {points!r}: expected an integer >= 2 (grid widths per axis)")
    rule = WidthRule(arch, channel_multiple)
    entries, index, of_layer = [], {}, []
    for layer in timed_layers(arch):
        step = layer.groups if layer.kind == "grouped" else 1  # a grouped conv's widths: multiples of its groups
        ins = _axis_values(arch, rule, layer.in_layout, points, step)
        outs = ins if layer.kind == "depthwise" else _axis_values(arch, rule, layer.out_layout, points, step)
        entry = {**_geometry(layer), "in_widths": ins, "out_widths": outs}
        key = repr(sorted(entry.items()))
        if key not in index:
            index[key] = len(entries)
            entries.append(entry)
        of_layer.append(index[key])
    return entries, of_layer


def layer_module(entry: dict, c_in: int, c_out: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The deployed layer at these widths (random weights) and its input shape without the batch."""
    if entry["kind"] == "linear":
        layer = nn.Linear(c_in * entry["factor"], c_out, bias=entry["bias"])
        shape = (c_in * entry["factor"],)
    elif entry["kind"] == "transposed":
        layer = nn.ConvTranspose2d(c_in, c_out, tuple(entry["kernel"]), tuple(entry["stride"]),
                                   tuple(entry["padding"]), tuple(entry["output_padding"]), entry["groups"],
                                   bias=entry["bias"], dilation=tuple(entry["dilation"]))
        shape = (c_in, *entry["in_hw"])
    else:
        groups = c_in if entry["kind"] == "depthwise" else entry["groups"]
        padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
        layer = nn.Conv2d(c_in, c_out if entry["kind"] != "depthwise" else c_in, tuple(entry["kernel"]),
                          tuple(entry["stride"]), padding, tuple(entry["dilation"]), groups, bias=entry["bias"])
        shape = (c_in, *entry["in_hw"])
    module = nn.Sequential(layer, getattr(nn, entry["act"])()) if entry["act"] else nn.Sequential(layer)
    return module.eval(), shape


# -- measuring --------------------------------------------------------------------------------------
def _case(name: str, module: nn.Module, shape, *, batch: int, runtime: str, device: str, threads: int, tmp: Path):
    from pas.latency import Case, _onnx_call, _torch_call
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
    if runtime == "pytorch":
        module = module.to(device)
        return Case(name, runtime, device, batch, _torch_call(module, x.to(device), device))
    import warnings
    handle, path = tempfile.mkstemp(suffix=".onnx", dir=tmp)  # any name, even one with a '/'
    os.close(handle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"])
    return Case(name, runtime, device, batch, _onnx_call(path, x.numpy(), device, threads))


def _compact_at(model: nn.Module, widths: list[int]) -> nn.Module:
    from pas.compact import compact
    return compact(model, model.arch.block_masks(widths)).eval()


def network_case(name, model, widths, *, batch, runtime, device, threads, tmp):
    """The timed case of `model`'s compact network at these widths (random weights: latency depends
    on the architecture only)."""
    net = _compact_at(model, widths)
    arch = model.arch
    return _case(name, net, (arch.in_channels, arch.resolution, arch.resolution), batch=batch, runtime=runtime,
                 device=device, threads=threads, tmp=tmp)


def measure_table(model: nn.Module, *, batch: int = 1, runtime: str = "onnxruntime", device: str = "cpu",
                  threads: int = 1, channel_multiple: int = 1, points: int = DEFAULT_POINTS, rounds: int = 10,
                  warmup: int = 3, check=DEFAULT_CHECK, check_random: int = DEFAULT_CHECK_RANDOM,
                  networks: int | None = None, ridge: float = RIDGE, progress=None) -> "LatencyTable":
    """Measure the latency table of `model` (a network with `.arch`, e.g. from `pas.models.build`)."""
    from pas.latency import RUNTIMES, devices, machine, time_alternately
    arch: Network = model.arch
    if runtime not in RUNTIMES:
        raise PasError(f"latency table runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    if device not in devices(runtime):
        raise PasError(f"latency table device {device!r} is not available to {runtime} here; expected one of "
                       f"{', '.join(devices(runtime))}")
    if batch < 1 or threads < 1:
        raise PasError(f"latency table batch {batch}, threads {threads}: expected positive integers")
    if any(not 0 < s < 1 for s in check):
        raise PasError(f"latency table check scales {list(check)}: expected fractions between 0 and 1")
    if isinstance(check_random, bool) or not isinstance(check_random, int) or check_random < 0:
        raise PasError(f"latency table check_random {check_random!r}: expected an integer >= 0 (random networks "
                       f"that check the prediction)")
    if networks is None:
        networks = default_networks(arch)
    if isinstance(networks, bool) or not isinstance(networks, int) or networks < 0:
        raise PasError(f"latency table networks {networks!r}: expected an integer >= 0 (random networks the "
                       f"calibration fits to; 0: one scale from the full and the 1/8 network)")
    if not ridge >= 0:
        raise PasError(f"latency table ridge {ridge!r}: expected a number >= 0")
    entries, of_layer = plan(arch, channel_multiple=channel_multiple, points=points)
    rule = WidthRule(arch, channel_multiple)
    t0 = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="pas-latency-table-") as tmp:
            tmp = Path(tmp)
            for e, entry in enumerate(entries):
                cases = []
                for i, c_in in enumerate(entry["in_widths"]):
                    for j, c_out in enumerate(entry["out_widths"]):
                        if entry["kind"] == "depthwise" and i != j:
                            continue
                        module, shape = layer_module(entry, c_in, c_out)
                        cases.append(_case(f"e{e}_{i}_{j}", module, shape, batch=batch, runtime=runtime,
                                           device=device, threads=threads, tmp=tmp))
                rows = time_alternately(cases, rounds=rounds, warmup=warmup)
                by_name = {c.model: r["latency_ms"] for c, r in zip(cases, rows)}
                entry["latency_ms"] = [[by_name.get(f"e{e}_{i}_{j}" if entry["kind"] != "depthwise" else
                                                    f"e{e}_{i}_{i}") for j in range(len(entry["out_widths"]))]
                                       for i in range(len(entry["in_widths"]))]
                if progress:
                    progress(f"entry {e + 1}/{len(entries)}: {entry['kind']} {len(cases)} points")
            nets = {"full": arch.full_widths(), "low": rule.scaled(CALIBRATION_SCALE),
                    **{f"check{s:g}": rule.scaled(s) for s in check},
                    **{f"random{i}": w for i, w in enumerate(random_widths(arch, rule, check_random, CHECK_SEED))},
                    **{f"fit{i}": w for i, w in enumerate(random_widths(arch, rule, networks))},
                    **({f"fit{s:g}": rule.scaled(s) for s in FIT_SCALES} if networks else {})}
            if progress:
                progress(f"timing {len(nets)} networks ({networks} for the calibration, "
                         f"{len(check) + check_random} to check it)")
            cases = [network_case(n, model, w, batch=batch, runtime=runtime, device=device, threads=threads,
                                   tmp=tmp) for n, w in nets.items()]
            measured = {c.model: r["latency_ms"] for c, r in zip(cases, time_alternately(cases, rounds=rounds,
                                                                                          warmup=warmup))}
    finally:
        torch.set_num_threads(previous)
    layers = [{"module": layer.module, "entry": e, "kind": layer.kind, "in_channels": layer.in_channels,
               "out_channels": layer.out_channels} for layer, e in zip(timed_layers(arch), of_layer)]
    import onnxruntime as ort
    data = {"format": TABLE_FORMAT, "backbone": arch.backbone, "resolution": arch.resolution,
            "in_channels": arch.in_channels, "num_classes": arch.num_classes, "runtime": runtime, "device": device,
            "batch": batch, "threads": threads, "channel_multiple": channel_multiple, "points": points,
            "rounds": rounds, "warmup": warmup, "machine": machine(threads),
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
            "entries": entries, "layers": layers, "scale": 1.0, "rest_ms": 0.0, "full_ms": measured["full"],
            "calibration": {"scale": CALIBRATION_SCALE, "widths": nets["low"], "measured_ms": measured["low"]},
            "check": []}
    raw = LatencyTable(data)
    full_sum, low_sum = raw.predict(arch, nets["full"]), raw.predict(arch, nets["low"])
    slope = (measured["full"] - measured["low"]) / (full_sum - low_sum) if full_sum > low_sum else 0.0
    two_point = slope if slope > 0 else 1.0
    data["calibration"]["two_point"] = {"scale": two_point, "rest_ms": measured["full"] - two_point * full_sum}
    if networks:
        fitted = ["full", "low", *(f"fit{s:g}" for s in FIT_SCALES), *(f"fit{i}" for i in range(networks))]
        factors, rest, error, prior = fit_calibration([raw.layer_terms(arch, nets[n]) for n in fitted],
                                                      [measured[n] for n in fitted],
                                                      raw.layer_terms(arch, nets["full"]), measured["full"],
                                                      ridge=ridge)
        for row, factor in zip(layers, factors):
            row["scale"] = factor
        data["rest_ms"] = rest
        data["calibration"].update({"method": "networks", "networks": networks, "ridge": ridge, "prior": prior,
                                    "fit_error": error, "fit": [{"widths": nets[n], "measured_ms": measured[n]}
                                                                for n in fitted]})
    else:
        data["scale"], data["rest_ms"] = two_point, data["calibration"]["two_point"]["rest_ms"]
        data["calibration"]["method"] = "two-point"
    table = LatencyTable(data)
    for scale, name in [*((s, f"check{s:g}") for s in check), *((None, f"random{i}") for i in range(check_random))]:
        widths = nets[name]
        predicted, got = table.predict(arch, widths), measured[name]
        data["check"].append({"scale": scale, "widths": widths, "measured_ms": got, "predicted_ms": predicted,
                              "error": predicted / got - 1})
    data["seconds"] = time.perf_counter() - t0
    return table  # its data holds the check and the seconds too


# -- the table and its prediction -------------------------------------------------------------------
class LatencyTable:
    """A measured table (the JSON `measure_table` writes) and the latency it predicts for a network."""

    def __init__(self, data: dict, source: str = "<table>"):
        self.data, self.source = data, source
        try:
            if data.get("format") != TABLE_FORMAT:
                raise KeyError("format")
            self.entries = [_Grid(e) for e in data["entries"]]
            self.layers = {r["module"]: r for r in data["layers"]}
            self.rest_ms, self.scale = float(data["rest_ms"]), float(data["scale"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise PasError(f"latency table {source!r} is malformed ({type(e).__name__}: {e}); expected the JSON "
                           f"written by pas latency-table ({TABLE_FORMAT})") from None

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        import json
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PasError(f"latency table {str(path)!r} does not exist") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PasError(f"latency table {str(path)!r} is not readable JSON ({e}); expected the file written by "
                           f"pas latency-table") from None
        if not isinstance(data, dict):
            raise PasError(f"latency table {str(path)!r} holds a {type(data).__name__}; expected the JSON object "
                           f"written by pas latency-table")
        return cls(data, str(path))

    def describe(self) -> str:
        d = self.data
        return f"{d['runtime']} {d['device']} batch {d['batch']} threads {d['threads']}"

    def check_network(self, arch: Network) -> None:
        """Refuse a table measured for another network (its layers, not only its name, must match)."""
        d = self.data
        ours = [(layer.module, layer.kind, layer.in_channels, layer.out_channels) for layer in timed_layers(arch)]
        theirs = [(r["module"], r["kind"], r["in_channels"], r["out_channels"]) for r in d["layers"]]
        if ours != theirs or d["resolution"] != arch.resolution:
            raise PasError(f"latency table {self.source!r} was measured for {d['backbone']} at {d['resolution']} px; "
                           f"this network is {arch.backbone} at {arch.resolution} px with other layers: expected a "
                           f"table from pas latency-table for this backbone and input size")

    def _terms(self, arch: Network, widths, input_grad: bool = True):
        """Each timed layer's row and its interpolated grid latency at these widths (ms), before any
        calibration (tensors for tensor widths)."""
        kept = arch._kept(widths)
        for layer in timed_layers(arch):
            row = self._row(layer)
            c_in, c_out = kept(layer.in_layout), kept(layer.out_layout)
            if not input_grad and isinstance(c_in, torch.Tensor):
                c_in = c_in.detach()
            yield row, self.entries[row["entry"]](c_in, c_out if layer.kind != "depthwise" else None)

    def layer_terms(self, arch: Network, widths) -> list[float]:
        """Each timed layer's interpolated grid latency at these integer widths (ms), before any
        calibration: what `predict` weighs and sums."""
        return [float(term) for _, term in self._terms(arch, widths)]

    def _row(self, layer: Layer) -> dict:
        row = self.layers.get(layer.module)
        if row is None:
            raise PasError(f"latency table {self.source!r} has no layer {layer.module!r}; expected a table "
                           f"measured for the network it predicts")
        return row

    def predict(self, arch: Network, widths=None, *, input_grad: bool = True):
        """Predicted latency (ms) of `arch` with these kept counts per searched group: a float for ints,
        a differentiable 0-d tensor for tensors (`input_grad=False` detaches every layer's input width,
        as the MACs penalty's "output" gradient does)."""
        total = 0.0
        for row, term in self._terms(arch, widths, input_grad):
            total = total + float(row.get("scale", 1.0)) * term  # tables before the fit: one global scale
        total = self.scale * total + self.rest_ms
        differentiable = widths is not None and any(isinstance(w, torch.Tensor) for w in widths)
        return total if differentiable else float(total)

    def csv_rows(self) -> list[dict]:
        """One row per measured point: entry, the layers that share it, geometry, widths, latency."""
        names: dict[int, list[str]] = {}
        for r in self.data["layers"]:
            names.setdefault(r["entry"], []).append(r["module"])
        rows = []
        for e, entry in enumerate(self.data["entries"]):
            for i, c_in in enumerate(entry["in_widths"]):
                for j, c_out in enumerate(entry["out_widths"]):
                    ms = entry["latency_ms"][i][j]
                    if ms is None:
                        continue
                    rows.append({"entry": e, "layers": " ".join(names.get(e, [])), "kind": entry["kind"],
                                 "kernel": "x".join(map(str, entry["kernel"])), "in_hw": entry["in_hw"][0],
                                 "stride": entry["stride"][0], "in_width": c_in, "out_width": c_out,
                                 "latency_ms": ms})
        return rows


class _Grid:
    """One entry's measurements, made monotone, and their bilinear interpolation."""

    def __init__(self, entry: dict):
        xs, ys = [float(v) for v in entry["in_widths"]], [float(v) for v in entry["out_widths"]]
        ms = entry["latency_ms"]
        if entry["kind"] == "depthwise":
            z = [[float(ms[i][i])] for i in range(len(xs))]
            ys = [0.0]
        else:
            z = [[float(v) for v in row] for row in ms]
        if len(z) != len(xs) or any(len(row) != len(ys) for row in z) or not xs or not ys:
            raise ValueError(f"a grid of {len(xs)}x{len(ys)} widths has {len(z)} rows of latencies")
        z = torch.tensor(z, dtype=torch.float64)
        z = torch.cummax(torch.cummax(z, 0).values, 1).values  # non-decreasing along both axes
        xs, ys = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
        if len(xs) == 1:  # a fixed axis: a flat second point, so one formula serves every grid
            xs, z = torch.cat([xs, xs + 1]), torch.cat([z, z])
        if len(ys) == 1:
            ys, z = torch.cat([ys, ys + 1]), torch.cat([z, z], 1)
        self.xs, self.ys, self.z = xs, ys, z
        self._on: dict = {}  # device -> (xs, ys, z) there

    def _grids(self, device):
        if device not in self._on:
            self._on[device] = (self.xs.to(device), self.ys.to(device), self.z.to(device))
        return self._on[device]

    @staticmethod
    def _cell(grid: torch.Tensor, value: torch.Tensor):
        """The cell of `grid` holding `value` (the last one beyond it) and the position in it, computed
        on the value's device (no host synchronisation in a training step)."""
        i = (torch.searchsorted(grid, value.detach().reshape(1), right=True) - 1).clamp(0, len(grid) - 2)[0]
        return i, (value - grid[i]) / (grid[i + 1] - grid[i])

    def __call__(self, c_in, c_out=None):
        """Interpolated latency at these widths (ints, or tensors: then differentiable, on their device);
        a depth-wise layer's grid has one axis (`c_out` None)."""
        device = next((v.device for v in (c_in, c_out) if isinstance(v, torch.Tensor)), torch.device("cpu"))
        xs, ys, z = self._grids(device)
        i, tx = self._cell(xs, _as_tensor(c_in, device))
        if c_out is None:
            j, ty = torch.zeros((), dtype=torch.long, device=device), 0.0
        else:
            j, ty = self._cell(ys, _as_tensor(c_out, device))
        return (1 - tx) * (1 - ty) * z[i, j] + tx * (1 - ty) * z[i + 1, j] + \
            (1 - tx) * ty * z[i, j + 1] + tx * ty * z[i + 1, j + 1]


def _as_tensor(v, device) -> torch.Tensor:
    return v.double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)


# -- CLI --------------------------------------------------------------------------------------------
def main(args) -> int:
    from pas.io import atomic_write_json, atomic_write_text
    from pas.models import build
    model = build(args.backbone, num_classes=args.num_classes, in_channels=args.in_channels,
                  resolution=args.resolution)
    table = measure_table(model, batch=args.batch, runtime=args.runtime, device=args.device, threads=args.threads,
                          channel_multiple=args.channel_multiple, points=args.points,
                          rounds=args.rounds, warmup=args.warmup, check=args.check, check_random=args.check_random,
                          networks=args.networks,
                          progress=lambda m: print(f"[latency-table] {m}", flush=True))
    if args.csv:
        import pandas as pd
        atomic_write_text(args.csv, pd.DataFrame(table.csv_rows()).to_csv(index=False))
    atomic_write_json(args.out, table.data)
    d = table.data
    print(f"{d['backbone']} at {d['resolution']} px, {table.describe()}: {len(d['entries'])} entries for "
          f"{len(d['layers'])} layers, measured in {d['seconds']:.0f} s; full network {d['full_ms']:.3f} ms, "
          f"{calibrated(d)}")
    for c in d["check"]:
        which = f"widths x{c['scale']:g}" if c["scale"] is not None else "random widths"
        print(f"  {which}: predicted {c['predicted_ms']:.3f} ms, measured {c['measured_ms']:.3f} ms "
              f"({c['error']:+.1%})")
    return 0


def calibrated(d: dict) -> str:
    c = d["calibration"]
    if c.get("method") == "networks":
        factors = [r["scale"] for r in d["layers"]]
        return (f"fitted to {len(c['fit'])} networks (median error {c['fit_error']:.1%}): layer factors "
                f"{min(factors):.2f}-{max(factors):.2f}, rest {d['rest_ms']:+.3f} ms")
    return f"calibrated as {d['scale']:.3f} x layers {d['rest_ms']:+.3f} ms"


def add_subcommand(sub) -> None:
    from pas.latency import RUNTIMES
    p = sub.add_parser("latency-table", help="measure per-layer latency over a grid of widths (for search.target "
                                             "in ms)")
    p.add_argument("--backbone", required=True, help="a registered network, torchvision:NAME or module:function")
    p.add_argument("--resolution", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--channel-multiple", type=int, default=1, help="search.channel_multiple of the searches that "
                                                                   "use the table (grid widths on it; default 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size the latency budget is for (default 1)")
    p.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS, help=f"grid widths per axis (default "
                                                                      f"{DEFAULT_POINTS})")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per point; the median is kept (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--check", type=float, nargs="*", default=list(DEFAULT_CHECK),
                   help="uniform width scales whose measured latency checks the prediction (default 0.25 0.5 0.75)")
    p.add_argument("--check-random", type=int, default=DEFAULT_CHECK_RANDOM,
                   help=f"random networks, not fitted to, that check the prediction too (default "
                        f"{DEFAULT_CHECK_RANDOM})")
    p.add_argument("--networks", type=int, default=None,
                   help="random networks the calibration is fitted to (default: two per timed layer plus eight; "
                        "0: one scale from the full and the 1/8 network)")
    p.add_argument("--csv", help="also write the grid as CSV (one row per measured point)")
    p.add_argument("--out", required=True, help="the table JSON written (atomically)")
    p.set_defaults(func=main)
