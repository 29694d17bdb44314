"""Instance segmentation (pas.models.yolact, pas.segmentation's training and decoding): the YOLACT
network's MACs against ptflops and its one output against its own layers, the box coding, the anchor
matching on a hand-computed case, an output built to reproduce the ground truth scored 100 box AP by
COCO's evaluator, and config/test_segmentation.yaml's whole DAG: every row lands on the target
(ptflops on the compact network), the deployed ONNX network gives the compact PyTorch network's
output and the same COCO AP."""
import json

import numpy as np
import pytest
import torch

from pas.flops import ptflops_macs
from pas.models import arch_for, build
from pas.models.yolact import split_outputs
from pas.segmentation import (anchor_boxes, coco_dict, coco_evaluate, decode_boxes, detections_from_masks,
                              encode_boxes, match_anchors, postprocess, scenes_from_dataset, targets_of, yolact_loss)

SHAPE = dict(num_classes=10, in_channels=1, resolution=64)


def test_yolact_macs_equal_ptflops_and_every_conv_before_the_outputs_is_searched():
    model = build("yolact_mini", **SHAPE)
    net = model.arch
    assert net.macs() == ptflops_macs(model, 1, 64) == 46_756_864
    names = net.group_names()
    # backbone (stem + 8), the FPN trunk (laterals added top-down), 3 smoothing convs, 3 head convs, 3 proto convs
    assert len(names) == 19 and "laterals.2 (+2)" in names
    assert not any(n.startswith(("classes", "boxes", "coefficients")) for n in names)  # they write the output


def test_split_outputs_gives_each_layers_output_back():
    model = build("yolact_mini", **SHAPE).eval()
    seen = {}
    for name in ("classes.1", "boxes.2", "coefficients.0", "proto"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(2, 1, 64, 64)
    classes, boxes, coefficients, protos = split_outputs(model(x), model.spec)
    a, c, k = model.spec.anchors, 10, model.spec.prototypes
    s3, s4, s5 = model.spec.level_sides()
    # level 1's anchors follow level 0's; row, column, then aspect
    lv1 = seen["classes.1"].view(2, a, c, s4, s4).permute(0, 3, 4, 1, 2).reshape(2, -1, c)
    assert torch.equal(classes[:, s3 * s3 * a:(s3 * s3 + s4 * s4) * a], lv1)
    lv2 = seen["boxes.2"].view(2, a, 4, s5, s5).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
    assert torch.equal(boxes[:, -s5 * s5 * a:], lv2)
    assert torch.equal(coefficients[:, :s3 * s3 * a], seen["coefficients.0"].view(2, a, k, s3, s3)
                       .permute(0, 3, 4, 1, 2).reshape(2, -1, k))
    assert torch.equal(protos, seen["proto"])
    assert len(anchor_boxes(model.spec)) == classes.shape[1] == a * (s3 * s3 + s4 * s4 + s5 * s5)


def test_box_coding_round_trips_and_matching_follows_iou():
    anchors = torch.tensor([[20.0, 20.0, 12.0, 12.0], [40.0, 40.0, 24.0, 24.0], [14.0, 20.0, 12.0, 12.0]])
    boxes = torch.tensor([[14.0, 14.0, 26.0, 26.0], [30.0, 31.0, 52.0, 49.0], [1.0, 2.0, 9.0, 7.0]])
    assert torch.allclose(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, atol=1e-4)
    # anchor 0 is box 0 exactly (IoU 1: positive); anchor 2 is box 0 moved by half its width:
    # IoU = 6*12 / (144 + 144 - 72) = 1/3 < 0.4: negative; anchor 1 overlaps box 1 with
    # IoU = (22*18) / (24*24) = 0.6875 >= 0.5: positive
    index, state = match_anchors(anchors, boxes[:2])
    assert state.tolist() == [1, 1, 0] and index[:2].tolist() == [0, 1]
    # a box no anchor overlaps 0.5 keeps its best anchor as a positive
    index, state = match_anchors(anchors, boxes[2:])
    assert int(state.sum()) == 1 and index[int(state.argmax())] == 0


def test_an_output_that_reproduces_the_truth_scores_100_box_ap_with_cocoeval():
    spec = build("yolact_mini", **SHAPE).spec
    scenes = scenes_from_dataset("val", count=4)
    anchors = anchor_boxes(spec)
    flats = []
    for t in targets_of(scenes):
        classes = torch.full((len(anchors), 10), -10.0)
        deltas = torch.zeros(len(anchors), 4)
        coefficients = torch.zeros(len(anchors), spec.prototypes)
        index, state = match_anchors(anchors, t["boxes"])
        # one positive anchor per box carries it (the others score -10: below the threshold)
        best = torch.tensor([int(torch.nonzero((index == j) & (state == 1))[0]) for j in range(len(t["boxes"]))])
        classes[best, t["labels"]] = 10.0
        deltas[best] = encode_boxes(t["boxes"], anchors[best])
        coefficients[best, 0] = 10.0  # tanh -> 1: mask = sigmoid(10 * proto 0) = 1 inside the box
        protos = torch.zeros(spec.prototypes, spec.proto_side(), spec.proto_side())
        protos[0] = 10.0
        flats.append(_flatten(classes, deltas, coefficients, protos, spec))
    flat = torch.stack(flats)  # laid out by _flatten: a wrong order in split_outputs loses the boxes
    detections = []
    for i, det in enumerate(postprocess(flat, spec, anchors)):
        detections += detections_from_masks(i + 1, det["masks"].numpy(), det["labels"].numpy(), det["scores"].numpy())
    result = coco_evaluate(coco_dict(scenes, [str(c) for c in range(10)]), detections)
    assert result["box_ap"] == pytest.approx(100.0) and result["box_ap50"] == pytest.approx(100.0)
    assert result["mask_ap"] < 100.0  # boxes filled, not silhouettes


def _flatten(classes, deltas, coefficients, protos, spec):
    """The network's flat layout (split_outputs' inverse) of per-anchor predictions."""
    a = spec.anchors
    parts, start = [], 0
    for side in spec.level_sides():
        n = side * side * a
        for block, per in ((classes, 10), (deltas, 4), (coefficients, spec.prototypes)):
            b = block[start:start + n].view(side, side, a, per).permute(2, 3, 0, 1)
            parts.append(b.reshape(-1))
        start += n
    return torch.cat(parts + [protos.reshape(-1)])


def test_yolact_loss_trains_every_part():
    model = build("yolact_mini", **SHAPE)
    scenes = scenes_from_dataset("train", count=4)
    loss, parts = yolact_loss(model(scenes.images * 2 - 1), targets_of(scenes), model.spec, anchor_boxes(model.spec))
    assert all(float(v) > 0 for v in parts.values())
    loss.backward()
    # (positives sit on the 4- and 8-px levels here; every level has negatives for the classes)
    for name in ("classes.2", "boxes.0", "coefficients.0", "proto.7", "stem.0"):
        assert model.get_submodule(name).weight.grad.abs().sum() > 0, name


# -- the workflow: config/test_segmentation.yaml's whole DAG --------------------------------------------

@pytest.mark.slow
def test_segmentation_workflow_runs_end_to_end(tmp_path):
    import onnxruntime as ort

    from pas.deploy import load_deployed
    from pas.segmentation import SceneLoader, segmentation_metrics
    from tests.test_workflow import ROOT, main_table, run_whole_dag
    run_whole_dag(tmp_path, ROOT / "config" / "test_segmentation.yaml", "segmentation")
    rows = {(r["method"], r["model"]): r for r in main_table(tmp_path)}
    assert set(rows) == {("pas", "PaS-Y50"), ("uniform", "uniform@PaS-Y50"), ("bn_gamma", "bn_gamma@PaS-Y50"),
                         ("l1", "l1@PaS-Y50"), ("full", "yolact_mini")}
    full = arch_for("yolact_mini", **SHAPE).macs()
    for (method, model), r in rows.items():
        assert int(r["macs"]) == int(r["macs_ptflops"]), model
        if method != "full":
            assert 0.99 * full / 2 <= int(r["macs"]) <= full / 2, model
        assert 0 <= float(r["mask_ap"]) <= 100 and 0 <= float(r["box_ap50"]) <= 100
    md = (tmp_path / "results" / "tables" / "main.md").read_text()
    assert "mask AP" in md and "top-1" not in md
    # the deployed PaS network: ONNX Runtime gives its output, and the same COCO AP as evaluate's
    d = tmp_path / "results" / "seed0" / "models" / "pas" / "PaS-Y50"
    model = load_deployed(d / "deploy" / "arch.json", d / "deploy" / "model.safetensors")
    val = scenes_from_dataset("val", count=16)
    loader = SceneLoader(val, batch_size=64, shuffle=False)
    x = next(iter(loader))[0]
    session = ort.InferenceSession(str(d / "deploy" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(out, model(x).numpy(), atol=1e-4)
    ev = json.loads((d / "eval.json").read_text())
    assert segmentation_metrics(model, loader, model.spec)["mask_ap"] == pytest.approx(ev["mask_ap"])
    from PIL import Image
    assert Image.open(tmp_path / "results" / "plots" / "samples.png").size[0] > 100


def test_scene_folder_round_trips_and_refuses_a_wrong_image(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from pas.segmentation import CocoLoader, coco_dict, normalise
    from pas.errors import PasError
    r = subprocess.run([sys.executable, "-m", "pas.cli", "scenes", "--count", "6", "--out-dir", str(tmp_path / "val")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    scenes = scenes_from_dataset("val", count=6)
    loader = CocoLoader(tmp_path / "val", canvas=64)
    assert loader.coco == json.loads(json.dumps(coco_dict(scenes, loader_classes())))
    assert (loader.images - normalise(scenes.images)).abs().max() <= 2 / 255 / 2 + 1e-6  # 8-bit PNG levels
    with pytest.raises(PasError, match="image 1 is 64x64 \\(width x height\\): expected 32x32"):
        CocoLoader(tmp_path / "val", canvas=32)
    Image.new("L", (60, 64)).save(tmp_path / "val" / "images" / "000003.png")
    with pytest.raises(PasError, match="image 3 is 60x64: expected 64x64"):
        CocoLoader(tmp_path / "val", canvas=64)


def loader_classes():
    from pas.data import ANIMAL_MNIST_CLASSES
    return list(ANIMAL_MNIST_CLASSES)
