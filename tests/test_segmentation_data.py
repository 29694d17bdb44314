"""pas.segmentation: composed instance-segmentation scenes, their COCO files and COCO AP.

The oracles are independent of the module: masks, boxes and silhouettes are recomputed with numpy
from each instance's recorded source, size and offset; COCO files are read back with pycocotools'
own COCO class; the AP values are computed by hand in the comments.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pas.data import ANIMAL_MNIST_CLASSES, load_animal_mnist
from pas.errors import PasError
from pas.segmentation import (MIN_VISIBLE_AREA, Instance, Scenes, coco_dict, coco_evaluate, compose_scenes,
                              detections_from_masks, read_coco, scenes_from_dataset, write_coco)

CANVAS = 64


@pytest.fixture(scope="module")
def raw():
    return load_animal_mnist()


@pytest.fixture(scope="module")
def scenes(raw):
    images, labels = raw
    return compose_scenes(images, labels, 50, canvas=CANVAS, seed=7)


@pytest.fixture(scope="module")
def gt(scenes):
    return coco_dict(scenes, ANIMAL_MNIST_CLASSES)


def _np_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _full_silhouette(source_image: np.ndarray, inst: Instance, canvas: int):
    """(foreground on the canvas, its values / 255, its unclipped area) of the whole placed silhouette."""
    x = torch.from_numpy(source_image).to(torch.float32)[None, None]
    resized = F.interpolate(x, size=inst.size, mode="bilinear", align_corners=False)[0, 0].numpy()
    ys, xs = np.nonzero(resized > 127)
    cy, cx = ys + inst.offset[1], xs + inst.offset[0]
    inside = (cy >= 0) & (cy < canvas) & (cx >= 0) & (cx < canvas)
    full = np.zeros((canvas, canvas), bool)
    full[cy[inside], cx[inside]] = True
    values = np.zeros((canvas, canvas), np.float32)
    values[cy[inside], cx[inside]] = resized[ys[inside], xs[inside]] / 255
    return full, values, len(ys)


def _check_scene(image: np.ndarray, instances: list[Instance], source_images: np.ndarray, source_labels, canvas):
    """Every invariant of one scene against numpy oracles; returns (occluded, cut by the border) counts."""
    assert 2 <= len(instances) <= 5
    masks = np.stack([inst.mask for inst in instances])
    assert masks.dtype == bool and masks.shape[1:] == (canvas, canvas)
    assert masks.sum(0).max() <= 1                              # visible masks never overlap
    np.testing.assert_array_equal(masks.any(0), image > 0)      # drawn pixels = union of the kept masks
    occluded = cut = 0
    for k, inst in enumerate(instances):
        assert inst.area == int(inst.mask.sum()) >= MIN_VISIBLE_AREA
        assert inst.box == _np_box(inst.mask)
        assert inst.label == int(source_labels[inst.source])
        assert round(28 * 0.8) <= min(inst.size) and max(inst.size) <= round(28 * 1.6)
        full, values, unclipped = _full_silhouette(source_images[inst.source], inst, canvas)
        assert not (inst.mask & ~full).any()                    # visible pixels belong to the silhouette
        later = masks[k + 1:].any(0)
        np.testing.assert_array_equal(full & ~inst.mask, full & later)  # hidden exactly where drawn over
        np.testing.assert_allclose(image[inst.mask], values[inst.mask], atol=1e-6)  # topmost value shown
        occluded += int(inst.area < full.sum())
        cut += int(full.sum() < unclipped)
    return occluded, cut


# ----------------------------------------------------------------------------- composition

def test_scenes_are_deterministic_per_seed(raw, scenes):
    images, labels = raw
    again = compose_scenes(images, labels, 50, canvas=CANVAS, seed=7)
    assert again.images.dtype == torch.float32 and again.images.shape == (50, 1, CANVAS, CANVAS)
    assert again.images.numpy().tobytes() == scenes.images.numpy().tobytes()
    assert json.dumps(coco_dict(again, ANIMAL_MNIST_CLASSES)) == json.dumps(coco_dict(scenes, ANIMAL_MNIST_CLASSES))
    for a, b in zip(again.instances, scenes.instances):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert (x.label, x.box, x.area, x.source, x.size, x.offset) == (y.label, y.box, y.area, y.source,
                                                                           y.size, y.offset)
            np.testing.assert_array_equal(x.mask, y.mask)
    # scene i does not depend on how many scenes are composed
    prefix = compose_scenes(images, labels, 5, canvas=CANVAS, seed=7)
    assert torch.equal(prefix.images, scenes.images[:5])
    other = compose_scenes(images, labels, 50, canvas=CANVAS, seed=8)
    assert not torch.equal(other.images, scenes.images)
    assert [[i.source for i in s] for s in other.instances] != [[i.source for i in s] for s in scenes.instances]


def test_masks_boxes_areas_and_pixels_match_numpy_oracles(raw, scenes):
    images, labels = raw
    x = scenes.images.numpy()
    assert x.min() >= 0.0 and x.max() <= 1.0
    occluded = cut = 0
    for i, instances in enumerate(scenes.instances):
        o, c = _check_scene(x[i, 0], instances, images, labels, CANVAS)
        occluded, cut = occluded + o, cut + c
    assert occluded > 0, "no instance of 50 scenes is partly hidden by a later one"
    assert cut > 0, "no instance of 50 scenes is cut by the canvas border"
    counts = {len(s) for s in scenes.instances}
    assert min(counts) == 2 and max(counts) > 3


def test_train_and_val_scenes_use_disjoint_silhouettes(raw):
    images, labels = raw
    train = scenes_from_dataset("train", count=40, canvas=CANVAS, seed=1)
    val = scenes_from_dataset("val", count=40, canvas=CANVAS, seed=1)
    for split in (train, val):                # sources index load_animal_mnist()'s arrays
        for i, instances in enumerate(split.instances):
            _check_scene(split.images[i, 0].numpy(), instances, images, labels, CANVAS)
    train_src = {inst.source for s in train.instances for inst in s}
    val_src = {inst.source for s in val.instances for inst in s}
    assert train_src and val_src and not train_src & val_src
    # not even a byte-identical copy of a silhouette is shared
    assert not {images[s].tobytes() for s in train_src} & {images[s].tobytes() for s in val_src}
    assert len(val_src) > 20                  # draws spread over the split, not one image reused


def test_impossible_scenes_and_bad_arguments_are_one_line_errors(raw):
    images, labels = raw
    with pytest.raises(PasError, match=r"scene 0 kept fewer than 2 instances") as e:
        compose_scenes(images, labels, 1, canvas=4)          # 16 pixels < MIN_VISIBLE_AREA
    assert "\n" not in str(e.value)
    with pytest.raises(PasError, match="min_instances 4 exceeds max_instances 3"):
        compose_scenes(images, labels, 1, min_instances=4, max_instances=3)
    with pytest.raises(PasError, match=r"scale \(1.6, 0.8\) is invalid"):
        compose_scenes(images, labels, 1, scale=(1.6, 0.8))
    with pytest.raises(PasError, match="split 'test' is unknown"):
        scenes_from_dataset("test", count=1)


# ----------------------------------------------------------------------------- COCO files

def test_coco_file_round_trips_through_pycocotools(tmp_path, scenes):
    from pycocotools.coco import COCO
    path = tmp_path / "scenes.json"
    write_coco(path, scenes, ANIMAL_MNIST_CLASSES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == list(range(1, len(scenes) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ANIMAL_MNIST_CLASSES
    assert coco.getCatIds() == list(range(1, 11))
    for i, instances in enumerate(scenes.instances):
        img = coco.loadImgs(i + 1)[0]
        assert (img["width"], img["height"]) == (CANVAS, CANVAS)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[i + 1]))
        assert len(anns) == len(instances)
        for ann, inst in zip(sorted(anns, key=lambda a: a["id"]), instances):
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), inst.mask)
            assert ann["bbox"] == [float(v) for v in _np_box(inst.mask)]
            assert ann["area"] == inst.mask.sum() and ann["iscrowd"] == 0
            assert ann["category_id"] == inst.label + 1
            assert isinstance(ann["segmentation"]["counts"], str)
    assert read_coco(path) == json.loads(path.read_text())


def _broken(tmp_path, gt, edit):
    d = json.loads(json.dumps(gt))
    edit(d)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(d))
    return path


def _one_line_error(call, *needles):
    with pytest.raises(PasError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_scene_files_are_one_line_errors_naming_the_image(tmp_path, gt):
    def drop_image_3(d):
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != 3]
    path = _broken(tmp_path, gt, drop_image_3)
    _one_line_error(lambda: read_coco(path), "image 3 has no annotations", "expected at least one instance")

    def small_mask_on_image_2(d):
        ann = next(a for a in d["annotations"] if a["image_id"] == 2)
        ann["segmentation"] = detections_from_masks(2, np.ones((1, 32, 32), bool), [0], [1.0])[0]["segmentation"]
    path = _broken(tmp_path, gt, small_mask_on_image_2)
    _one_line_error(lambda: read_coco(path), "of image 2 has a mask of size [32, 32]", "expected the image's size [64, 64]")

    def shrink_image_4(d):
        d["images"][3].update(width=32, height=32)
    path = _broken(tmp_path, gt, shrink_image_4)
    _one_line_error(lambda: read_coco(path), "image 4 is 32x32", "expected 64x64")

    good = _broken(tmp_path, gt, lambda d: None)
    _one_line_error(lambda: read_coco(good, canvas=32), "image 1 is 64x64", "expected 32x32")
    empty = json.loads(json.dumps(gt))
    empty["annotations"] = []
    _one_line_error(lambda: coco_evaluate(empty, []), "image 1 has no annotations")


# ----------------------------------------------------------------------------- metric

def _gt_detections(scenes, *, shift_label=0):
    dets = []
    for i, instances in enumerate(scenes.instances):
        labels = [(inst.label + shift_label) % 10 for inst in instances]
        dets += detections_from_masks(i + 1, np.stack([inst.mask for inst in instances]), labels,
                                      [1.0] * len(instances))
    return dets


def test_ground_truth_as_detections_scores_100_and_wrong_categories_0(scenes, gt):
    assert coco_evaluate(gt, _gt_detections(scenes)) == {"mask_ap": 100.0, "mask_ap50": 100.0,
                                                         "box_ap": 100.0, "box_ap50": 100.0}
    assert coco_evaluate(gt, _gt_detections(scenes, shift_label=1)) == {"mask_ap": 0.0, "mask_ap50": 0.0,
                                                                        "box_ap": 0.0, "box_ap50": 0.0}
    # boxes alone: box AP from them, no mask to score
    boxes = [{k: d[k] for k in ("image_id", "category_id", "score", "bbox")} for d in _gt_detections(scenes)]
    assert coco_evaluate(gt, boxes) == {"mask_ap": 0.0, "mask_ap50": 0.0, "box_ap": 100.0, "box_ap50": 100.0}
    assert coco_evaluate(gt, []) == {"mask_ap": 0.0, "mask_ap50": 0.0, "box_ap": 0.0, "box_ap50": 0.0}


def _square_scene() -> dict:
    """One 32x32 scene with one 10x10 square of class 0 at rows/cols 5..14."""
    mask = np.zeros((32, 32), bool)
    mask[5:15, 5:15] = True
    inst = Instance(label=0, mask=mask, box=(5, 5, 10, 10), area=100, source=0, size=(10, 10), offset=(5, 5))
    return coco_dict(Scenes(images=torch.zeros(1, 1, 32, 32), instances=[[inst]], canvas=32), ["square"])


def _band(rows: int) -> np.ndarray:
    """The top ``rows`` rows of the square: 10 x rows pixels, all inside it."""
    m = np.zeros((1, 32, 32), bool)
    m[0, 5:5 + rows, 5:15] = True
    return m


def test_ap_of_hand_computed_cases():
    gt = _square_scene()
    # The detection is the square's top half: IoU = |det & gt| / |det | gt| = 50 / 100 = 0.5 exactly, for
    # the masks and for the boxes ([5, 5, 10, 5] in [5, 5, 10, 10]). COCOeval matches a detection at
    # threshold t when IoU >= t (evaluateImg skips only IoU < t), over t = 0.50, 0.55, ..., 0.95: so it
    # matches at 0.50 only. There, one gt and one true positive: precision 1 at all 101 recall points,
    # AP50 = 1. At the 9 other thresholds the detection is a false positive, recall stays 0, precision 0.
    # AP@[.50:.95] = (1 + 9 * 0) / 10 = 0.1, i.e. 10 %.
    half = coco_evaluate(gt, detections_from_masks(1, _band(5), [0], [0.9]))
    assert half == pytest.approx({"mask_ap": 10.0, "mask_ap50": 100.0, "box_ap": 10.0, "box_ap50": 100.0})
    # 40 of 100 pixels: IoU 0.4 < 0.5 matches at no threshold -> 0 everywhere
    assert coco_evaluate(gt, detections_from_masks(1, _band(4), [0], [0.9])) == pytest.approx(
        {"mask_ap": 0.0, "mask_ap50": 0.0, "box_ap": 0.0, "box_ap50": 0.0})
    # the exact square (IoU 1, a TP at every threshold) scored 0.5, below a false positive elsewhere scored
    # 0.9: ranked by score, FP then TP, so recall reaches 1 at precision 1/2; the interpolated precision
    # is 1/2 at all 101 recall points and every threshold -> AP = AP50 = 50 %.
    fp = np.zeros((1, 32, 32), bool)
    fp[20:30, 20:30] = True
    dets = detections_from_masks(1, np.concatenate([_band(10), fp]), [0, 0], [0.5, 0.9])
    assert coco_evaluate(gt, dets) == pytest.approx({"mask_ap": 50.0, "mask_ap50": 50.0,
                                                    "box_ap": 50.0, "box_ap50": 50.0})
