"""Instance-segmentation data and metric at small scale: scenes of animal silhouettes, COCO files, COCO AP.

The paper also prunes an instance-segmentation network (YOLACT). This module gives that task its
data and its metric offline, from the package's own animal-mnist silhouettes:

* :func:`compose_scenes` pastes 2-5 silhouettes (resized by a random factor, bilinear; the
  foreground is every pixel > 127 after resizing) onto a black ``canvas`` x ``canvas`` image.
  Each is placed with at least half of its tight box inside the canvas along each axis, so some
  are cut by the border. Later instances are drawn over earlier ones, so an instance's mask is
  its *visible* pixels only and occlusion is common.
* Placement is decided before anything is drawn: all instances and positions of a scene are
  chosen first, the visible masks computed, and every instance with fewer than
  :data:`MIN_VISIBLE_AREA` visible pixels is dropped *and not drawn*. Dropping only uncovers
  pixels of the remaining instances, so their visible areas only grow and one recomputation
  suffices. The image therefore shows exactly the annotated instances: its foreground
  (pixels > 0) is the union of the masks, and each pixel carries the topmost instance's grayscale
  value. A scene left with fewer than ``min_instances`` instances is redrawn from the same
  generator (deterministic), at most :data:`MAX_ATTEMPTS` times.
* Every scene has its own generator, ``pas.data._generator(seed, scene_index)``, so the same
  arguments give the same bytes and scene ``i`` does not depend on ``count``.
* :func:`scenes_from_dataset` composes the train or val scenes from the silhouettes of that
  split only, using the same de-duplication and stratified split as ``load_data("animal_mnist",
  seed=split_seed)``: train and val scenes never share a silhouette (nor a byte-identical copy).
* :func:`coco_dict` / :func:`write_coco` give the COCO annotation format, so the metric is
  pycocotools' own ``COCOeval`` (:func:`coco_evaluate`), not a re-implementation. Conventions:
  image ids are scene index + 1 (``file_name`` is nominal: the pixels are ``Scenes.images[id - 1]``),
  category ids are class index + 1, annotation ids count from 1, and RLE ``counts`` are ``str``
  (pycocotools returns bytes, which json cannot write; pycocotools reads either).
* :func:`validate_coco` (used by :func:`read_coco` and :func:`coco_evaluate`) turns what would
  otherwise be an assertion deep in pycocotools or a silently wrong AP -- a scene without
  instances, a mask of another size than its image, an image of another size than expected --
  into a one-line :class:`PasError` naming the image id.

Training and measuring a YOLACT network (`pas.models.yolact`) on the scenes: anchors at three FPN
levels matched to the instances by IoU (YOLACT's 0.5/0.4), a focal loss on the classes (RetinaNet's,
in place of YOLACT's OHEM: simpler, no background class), smooth-L1 on SSD-encoded boxes, the
assembled masks' BCE inside their boxes; decoding by class-wise NMS; `SegmentationTrainer` is the
engine's Trainer with that loss and COCO AP as its validation, so PaS's search, the baselines and
fine-tuning run on it unchanged. `write_scene_set`/`CocoLoader`: the validation scenes as a COCO
folder (annotations.json, images/*.png) that evaluation reads.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pas.data import _check_positive, _check_seed, _generator, dedup_images, load_animal_mnist, stratified_split
from pas.engine import Trainer
from pas.errors import PasError
from pas.io import atomic_write_json, read_json

__all__ = [
    "MIN_VISIBLE_AREA", "MAX_ATTEMPTS", "Instance", "Scenes", "compose_scenes", "scenes_from_dataset",
    "coco_dict", "write_coco", "read_coco", "validate_coco", "detections_from_masks", "coco_evaluate",
    "anchor_boxes", "encode_boxes", "decode_boxes", "match_anchors", "yolact_loss", "postprocess", "targets_of",
    "SceneLoader", "CocoLoader", "write_scene_set", "segmentation_metrics", "SegmentationTrainer", "save_samples",
]

MIN_VISIBLE_AREA = 20  # an instance with fewer visible pixels is dropped (and not drawn)
MAX_ATTEMPTS = 100     # redraws of one scene before giving up on min_instances
FOREGROUND = 127       # a resized silhouette pixel is foreground above this uint8 value


@dataclass(frozen=True)
class Instance:
    """One annotated animal of a scene.

    ``mask`` is bool (canvas, canvas), its visible pixels; ``box`` (x, y, w, h) the tight box of
    ``mask``; ``area`` its pixel count. ``source`` is the silhouette's index in the images it was
    drawn from, ``size`` (h, w) its resized shape and ``offset`` (x, y) where the resized
    silhouette's top-left corner lies on the canvas (may be negative).
    """
    label: int
    mask: np.ndarray
    box: tuple[int, int, int, int]
    area: int
    source: int
    size: tuple[int, int]
    offset: tuple[int, int]


@dataclass(frozen=True)
class Scenes:
    """``images`` float32 (count, 1, canvas, canvas) in [0, 1]; ``instances[i]`` the instances of
    scene i in drawing order (later ones on top)."""
    images: torch.Tensor
    instances: list[list[Instance]]
    canvas: int

    def __len__(self) -> int:
        return len(self.instances)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _paste(patch: np.ndarray, offset: tuple[int, int], canvas: int, fill) -> np.ndarray:
    """``patch`` placed with its top-left corner at ``offset`` (x, y) on a canvas of ``fill``, clipped."""
    out = np.full((canvas, canvas), fill, dtype=patch.dtype)
    x, y = offset
    h, w = patch.shape
    y0, y1, x0, x1 = max(y, 0), min(y + h, canvas), max(x, 0), min(x + w, canvas)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    return out


def _place(image: np.ndarray, factor: float, canvas: int, g: torch.Generator):
    """Resize one silhouette by ``factor`` and place it at a random position; ``None`` if it has no
    foreground. Returns (size, offset, foreground on the canvas, values / 255 on the canvas)."""
    h, w = image.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    x = torch.from_numpy(image).to(torch.float32)[None, None]
    resized = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    fg = resized > FOREGROUND
    box = _tight_box(fg)
    if box is None:
        return None
    bx, by, bw, bh = box
    # the box's top-left corner, with at least half the box inside the canvas along each axis
    px = int(torch.randint(-(bw // 2), canvas - (bw - bw // 2) + 1, (1,), generator=g))
    py = int(torch.randint(-(bh // 2), canvas - (bh - bh // 2) + 1, (1,), generator=g))
    offset = (px - bx, py - by)
    values = np.clip(resized / 255.0, 0.0, 1.0).astype(np.float32)
    return size, offset, _paste(fg, offset, canvas, False), _paste(values, offset, canvas, 0.0)


def _owner(foregrounds: list[np.ndarray], canvas: int) -> np.ndarray:
    """Per pixel, the index of the topmost foreground covering it (-1: background)."""
    owner = np.full((canvas, canvas), -1, dtype=np.int64)
    for k, fg in enumerate(foregrounds):
        owner[fg] = k
    return owner


def _compose_one(images, labels, n, canvas, scale, min_instances, g, scene):
    for _ in range(MAX_ATTEMPTS):
        placed = []
        for _ in range(n):
            source = int(torch.randint(len(images), (1,), generator=g))
            factor = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g))
            p = _place(images[source], factor, canvas, g)
            if p is not None:
                placed.append((source, *p))
        areas = np.bincount(_owner([p[3] for p in placed], canvas).ravel() + 1, minlength=len(placed) + 1)[1:]
        kept = [p for p, a in zip(placed, areas) if a >= MIN_VISIBLE_AREA]
        if len(kept) < min_instances:
            continue
        owner = _owner([p[3] for p in kept], canvas)
        image = np.zeros((canvas, canvas), dtype=np.float32)
        instances = []
        for k, (source, size, offset, fg, values) in enumerate(kept):
            image[fg] = values[fg]
            mask = owner == k
            instances.append(Instance(label=int(labels[source]), mask=mask, box=_tight_box(mask),
                                      area=int(mask.sum()), source=source, size=size, offset=offset))
        return image, instances
    raise PasError(f"scene {scene} kept fewer than {min_instances} instances with at least {MIN_VISIBLE_AREA} "
                   f"visible pixels in {MAX_ATTEMPTS} attempts: expected a larger canvas, a larger scale "
                   "or a smaller min_instances")


def compose_scenes(images: np.ndarray, labels: np.ndarray, count: int, *, canvas: int = 64,
                   min_instances: int = 2, max_instances: int = 5, scale: tuple[float, float] = (0.8, 1.6),
                   seed: int = 0) -> Scenes:
    """``count`` scenes of ``min_instances``..``max_instances`` silhouettes from ``images`` (uint8 (N, H, W),
    white on black) with class ``labels`` (N,), each resized by a factor drawn uniformly from ``scale``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) == 0 or labels.shape != (len(images),):
        raise PasError(f"compose_scenes got images {images.shape} {images.dtype} and labels {labels.shape}: "
                       "expected uint8 (N, H, W) with N >= 1 and labels (N,)")
    _check_positive("count", count, allow_none=False)
    _check_positive("canvas", canvas, allow_none=False)
    _check_positive("min_instances", min_instances, allow_none=False)
    _check_positive("max_instances", max_instances, allow_none=False)
    if min_instances > max_instances:
        raise PasError(f"min_instances {min_instances} exceeds max_instances {max_instances}: "
                       "expected min_instances <= max_instances")
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 < lo <= hi:
        raise PasError(f"scale {scale!r} is invalid: expected (low, high) with 0 < low <= high")
    seed = _check_seed(seed)
    out = torch.zeros(count, 1, canvas, canvas, dtype=torch.float32)
    instances = []
    for i in range(count):
        g = _generator(seed, i)
        n = int(torch.randint(min_instances, max_instances + 1, (1,), generator=g))
        image, scene = _compose_one(images, labels, n, canvas, (lo, hi), min_instances, g, i)
        out[i, 0] = torch.from_numpy(image)
        instances.append(scene)
    return Scenes(images=out, instances=instances, canvas=canvas)


def scenes_from_dataset(split: str, *, count: int, canvas: int = 64, val_fraction: float = 0.2,
                        split_seed: int = 0, seed: int = 0) -> Scenes:
    """Scenes composed only from the ``split`` ("train" or "val") silhouettes of animal-mnist.

    The split is ``load_data("animal_mnist", val_fraction=val_fraction, seed=split_seed)``'s
    (duplicates removed first); ``Instance.source`` indexes ``load_animal_mnist()``'s arrays.
    """
    if split not in ("train", "val"):
        raise PasError(f"split {split!r} is unknown: expected 'train' or 'val'")
    images, labels = load_animal_mnist()
    keep, _, _ = dedup_images(images, labels)
    train_idx, val_idx = stratified_split(labels[keep], val_fraction, split_seed)
    idx = keep[train_idx if split == "train" else val_idx]
    scenes = compose_scenes(images[idx], labels[idx], count, canvas=canvas, seed=seed)
    remapped = [[replace(inst, source=int(idx[inst.source])) for inst in scene] for scene in scenes.instances]
    return replace(scenes, instances=remapped)


# ----------------------------------------------------------------------------- COCO format

def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_dict(scenes: Scenes, classes: list[str]) -> dict:
    """The COCO annotation dict of ``scenes`` (ids: image = scene index + 1, category = label + 1)."""
    images, annotations = [], []
    for i, scene in enumerate(scenes.instances):
        image_id = i + 1
        images.append({"id": image_id, "width": scenes.canvas, "height": scenes.canvas,
                       "file_name": f"{image_id:06d}.png"})
        for inst in scene:
            if not 0 <= inst.label < len(classes):
                raise PasError(f"image {image_id} has an instance of label {inst.label}: expected a label "
                               f"in 0..{len(classes) - 1} (one per class of {len(classes)})")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": inst.label + 1,
                                "segmentation": _rle(inst.mask), "area": int(inst.area),
                                "bbox": [float(v) for v in inst.box], "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_coco(path: str | Path, scenes: Scenes, classes: list[str]) -> None:
    """Write :func:`coco_dict` to ``path`` atomically."""
    atomic_write_json(path, coco_dict(scenes, classes))


def validate_coco(coco: dict, *, canvas: int | None = None, source: str = "COCO annotations") -> dict:
    """Check ``coco`` is a scene file this module can evaluate; return it.

    Every image must be ``canvas`` x ``canvas`` (default: the first image's size), have at least one
    annotation, and every annotation an RLE mask of its image's size and a known category.
    """
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise PasError(f"{source} is not a COCO annotation dict: expected lists 'images', 'annotations' "
                       "and 'categories'")
    if not coco["images"]:
        raise PasError(f"{source} has no images: expected at least one scene")
    try:
        sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in coco["images"]}
        categories = {c["id"] for c in coco["categories"]}
    except (KeyError, TypeError, ValueError):
        raise PasError(f"{source} has an image without integer id, width and height or a category without "
                       "id: expected COCO 'images' and 'categories' entries") from None
    expected = (canvas, canvas) if canvas is not None else next(iter(sizes.values()))
    for image_id, size in sizes.items():
        if size != expected:
            raise PasError(f"{source}: image {image_id} is {size[1]}x{size[0]} (width x height): expected "
                           f"{expected[1]}x{expected[0]}")
    counts = dict.fromkeys(sizes, 0)
    for ann in coco["annotations"]:
        image_id, ann_id = ann.get("image_id"), ann.get("id")
        if image_id not in sizes:
            raise PasError(f"{source}: annotation {ann_id} refers to image {image_id!r}: expected one of the "
                           f"{len(sizes)} image ids")
        seg = ann.get("segmentation")
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise PasError(f"{source}: annotation {ann_id} of image {image_id} has no RLE segmentation: "
                           "expected {'size': [h, w], 'counts': ...}")
        if tuple(seg["size"]) != sizes[image_id]:
            h, w = sizes[image_id]
            raise PasError(f"{source}: annotation {ann_id} of image {image_id} has a mask of size "
                           f"{list(seg['size'])} (h, w): expected the image's size [{h}, {w}]")
        if ann.get("category_id") not in categories:
            raise PasError(f"{source}: annotation {ann_id} of image {image_id} has category "
                           f"{ann.get('category_id')!r}: expected one of {sorted(categories)}")
        counts[image_id] += 1
    for image_id, n in counts.items():
        if n == 0:
            raise PasError(f"{source}: image {image_id} has no annotations: expected at least one instance "
                           "per scene")
    return coco


def read_coco(path: str | Path, *, canvas: int | None = None) -> dict:
    """A COCO scene file written by :func:`write_coco`, checked by :func:`validate_coco`."""
    return validate_coco(read_json(path), canvas=canvas, source=str(path))


# ----------------------------------------------------------------------------- metric

def detections_from_masks(image_id: int, masks: np.ndarray, labels, scores) -> list[dict]:
    """COCO detections of one image from predicted bool masks (k, H, W), class labels (0-based) and
    scores: RLE segmentation and the mask's box, category_id = label + 1."""
    from pycocotools import mask as mask_utils
    masks = np.asarray(masks, dtype=bool)
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores, dtype=np.float64).reshape(-1)
    if masks.ndim != 3 or len(labels) != len(masks) or len(scores) != len(masks):
        raise PasError(f"detections of image {image_id}: masks {masks.shape}, labels {labels.shape} and scores "
                       f"{scores.shape}: expected (k, H, W), (k,) and (k,)")
    out = []
    for mask, label, score in zip(masks, labels, scores):
        rle = _rle(mask)
        out.append({"image_id": int(image_id), "category_id": int(label) + 1, "score": float(score),
                    "segmentation": rle, "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return out


def _average_precision(gt: dict, detections: list[dict], iou_type: str) -> tuple[float, float]:
    """(AP@[.50:.95], AP@.50) in % by pycocotools' COCOeval over all areas, its prints silenced."""
    if not detections:
        return 0.0, 0.0
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)  # COCOeval writes into the ground-truth annotations
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50 = (float(s) * 100.0 for s in evaluator.stats[:2])
    return ap, ap50


def coco_evaluate(gt: dict, detections: list[dict]) -> dict:
    """Mask and box AP (in %, 0-100) of ``detections`` against the COCO dict ``gt``.

    A detection is ``{image_id, category_id, score, segmentation (RLE) and/or bbox [x, y, w, h]}``.
    Mask AP uses the detections with a segmentation; box AP uses every detection, its box taken
    from ``bbox`` or else from its mask. No detections at all gives zeros.
    """
    from pycocotools import mask as mask_utils
    validate_coco(gt, source="ground truth")
    images, categories = {img["id"] for img in gt["images"]}, {c["id"] for c in gt["categories"]}
    segm, bbox = [], []
    for k, det in enumerate(detections):
        if det.get("image_id") not in images or det.get("category_id") not in categories or "score" not in det:
            raise PasError(f"detection {k} (image {det.get('image_id')!r}, category {det.get('category_id')!r}) "
                           "is invalid: expected a ground-truth image id, a category id and a score")
        if "segmentation" not in det and "bbox" not in det:
            raise PasError(f"detection {k} of image {det['image_id']} has neither segmentation nor bbox: "
                           "expected at least one")
        base = {key: det[key] for key in ("image_id", "category_id", "score")}
        if "segmentation" in det:
            segm.append({**base, "segmentation": det["segmentation"]})
        box = det["bbox"] if "bbox" in det else mask_utils.toBbox(det["segmentation"])
        bbox.append({**base, "bbox": [float(v) for v in box]})
    mask_ap, mask_ap50 = _average_precision(gt, segm, "segm")
    box_ap, box_ap50 = _average_precision(gt, bbox, "bbox")
    return {"mask_ap": mask_ap, "mask_ap50": mask_ap50, "box_ap": box_ap, "box_ap50": box_ap50}


# -- the YOLACT objective and decoding ---------------------------------------------------------------

VARIANCES = (0.1, 0.2)  # box encoding of SSD and YOLACT: centre offsets / 0.1, log sizes / 0.2
POSITIVE_IOU, NEGATIVE_IOU = 0.5, 0.4  # anchor matching (YOLACT's); between them: ignored
LOSS_WEIGHTS = {"classes": 1.0, "boxes": 1.5, "masks": 6.125}  # YOLACT's box and mask weights


def anchor_boxes(spec) -> torch.Tensor:
    """Every anchor as (cx, cy, w, h) in pixels, in `pas.models.yolact.split_outputs`' order: level,
    row, column, aspect."""
    from pas.models.yolact import ANCHOR_SCALE, ASPECTS, STRIDES
    out = []
    for stride, side in zip(STRIDES, spec.level_sides()):
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        size = ANCHOR_SCALE * stride
        per = [torch.stack([cx, cy, torch.full_like(cx, size * a ** 0.5), torch.full_like(cx, size / a ** 0.5)], -1)
               for a in ASPECTS]
        out.append(torch.stack(per, 2).reshape(-1, 4))
    return torch.cat(out)


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    c, s = cxcywh[..., :2], cxcywh[..., 2:]
    return torch.cat([c - s / 2, c + s / 2], -1)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) boxes relative to (cx, cy, w, h) anchors, as the network predicts them."""
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)
    return torch.cat([(centre - anchors[:, :2]) / anchors[:, 2:] / VARIANCES[0],
                      torch.log(size / anchors[:, 2:]) / VARIANCES[1]], 1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    centre = anchors[:, :2] + deltas[..., :2] * VARIANCES[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp((deltas[..., 2:] * VARIANCES[1]).clamp(max=4.0))
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor: the index of its ground-truth box and 1 (positive: IoU >= 0.5, or the best anchor
    of a box), 0 (negative: IoU < 0.4) or -1 (ignored)."""
    from torchvision.ops import box_iou
    state = torch.zeros(len(anchors), dtype=torch.long)
    if len(boxes) == 0:
        return torch.zeros(len(anchors), dtype=torch.long), state
    iou = box_iou(_xyxy(anchors), boxes)  # (anchors, boxes)
    best, index = iou.max(1)
    state[best >= NEGATIVE_IOU] = -1
    state[best >= POSITIVE_IOU] = 1
    forced = iou.argmax(0)  # every box keeps its best anchor
    index[forced] = torch.arange(len(boxes))
    state[forced] = 1
    return index, state


def _crop(masks: torch.Tensor, boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """1 inside each box (pixel centres, boxes in canvas pixels scaled by `scale`), else 0: (k, S, S)."""
    s = masks.shape[-1]
    centres = (torch.arange(s, dtype=masks.dtype, device=masks.device) + 0.5) / scale
    x = (centres[None, :] >= boxes[:, 0:1]) & (centres[None, :] < boxes[:, 2:3])  # (k, S)
    y = (centres[None, :] >= boxes[:, 1:2]) & (centres[None, :] < boxes[:, 3:4])
    return (y[:, :, None] & x[:, None, :]).to(masks.dtype)


def yolact_loss(flat: torch.Tensor, targets: list[dict], spec, anchors: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Focal loss on the classes of every non-ignored anchor (normalised by the positives), smooth L1
    on the boxes and binary cross-entropy of the assembled masks inside their ground-truth boxes
    (normalised by the box area, YOLACT's), for the positive anchors."""
    from torchvision.ops import sigmoid_focal_loss

    from pas.models.yolact import split_outputs
    classes, deltas, coefficients, protos = split_outputs(flat, spec)
    side = protos.shape[-1]
    scale = side / spec.resolution
    total = {"classes": flat.new_zeros(()), "boxes": flat.new_zeros(()), "masks": flat.new_zeros(())}
    positives = 0
    for i, t in enumerate(targets):
        index, state = match_anchors(anchors, t["boxes"])
        pos = state == 1
        want = torch.zeros_like(classes[i])
        if len(t["boxes"]):
            want[pos, t["labels"][index[pos]]] = 1.0
        keep = state >= 0
        total["classes"] = total["classes"] + sigmoid_focal_loss(classes[i][keep], want[keep], reduction="sum")
        n = int(pos.sum())
        positives += n
        if n == 0:
            continue
        boxes = t["boxes"][index[pos]]
        total["boxes"] = total["boxes"] + F.smooth_l1_loss(deltas[i][pos], encode_boxes(boxes, anchors[pos]),
                                                           reduction="sum")
        gt = F.interpolate(t["masks"][index[pos]][:, None].float(), size=(side, side), mode="area")[:, 0]
        logits = torch.einsum("khw,nk->nhw", protos[i], torch.tanh(coefficients[i][pos]))
        crop = _crop(gt, boxes, scale)
        bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none") * crop
        area = crop.sum((1, 2)).clamp_min(1.0)
        total["masks"] = total["masks"] + (bce.sum((1, 2)) / area).sum()
    norm = max(positives, 1)
    parts = {k: v / norm for k, v in total.items()}
    return sum(LOSS_WEIGHTS[k] * v for k, v in parts.items()), parts


@torch.no_grad()
def postprocess(flat: torch.Tensor, spec, anchors: torch.Tensor, *, score_threshold: float = 0.05,
                nms_iou: float = 0.5, max_detections: int = 20) -> list[dict]:
    """Per image: the best class of every anchor above the score threshold, class-wise NMS, the top
    detections, their masks (sigmoid(prototypes . coefficients) up-sampled to the image, cropped to the
    box, > 0.5)."""
    from torchvision.ops import batched_nms

    from pas.models.yolact import split_outputs
    classes, deltas, coefficients, protos = split_outputs(flat, spec)
    out = []
    for i in range(len(flat)):
        scores, labels = classes[i].sigmoid().max(1)
        keep = scores > score_threshold
        boxes = decode_boxes(deltas[i][keep], anchors[keep]).clamp(0, spec.resolution)
        scores, labels, coef = scores[keep], labels[keep], coefficients[i][keep]
        top = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
        boxes, scores, labels, coef = boxes[top], scores[top], labels[top], coef[top]
        logits = torch.einsum("khw,nk->nhw", protos[i], torch.tanh(coef))
        masks = F.interpolate(logits[:, None], size=(spec.resolution, spec.resolution), mode="bilinear",
                              align_corners=False)[:, 0].sigmoid()
        masks = (masks * _crop(masks, boxes, 1.0)) > 0.5
        out.append({"boxes": boxes, "scores": scores, "labels": labels, "masks": masks})
    return out


# -- training and measuring a YOLACT network on the scenes ---------------------------------------------

def targets_of(scenes: Scenes) -> list[dict]:
    """Per scene: boxes (k, 4) as (x1, y1, x2, y2), labels (k,) and masks (k, H, W) as tensors."""
    out = []
    for scene in scenes.instances:
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (i.box for i in scene)], dtype=torch.float32)
        out.append({"boxes": boxes.reshape(-1, 4), "labels": torch.tensor([i.label for i in scene], dtype=torch.long),
                    "masks": torch.from_numpy(np.stack([i.mask for i in scene])) if scene else
                    torch.zeros(0, scenes.canvas, scenes.canvas, dtype=torch.bool)})
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the network reads them: [-1, 1]."""
    return images * 2 - 1


class SceneLoader:
    """One epoch of (images, targets) batches in a (seed, epoch) order; `shuffle=False` for validation."""

    def __init__(self, scenes: Scenes, *, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True):
        from pas.data import epoch_indices
        self.images, self.targets, self.batch_size = normalise(scenes.images), targets_of(scenes), batch_size
        self.scenes = scenes
        self.order = epoch_indices(len(scenes), shuffle=shuffle, seed=seed, epoch=epoch, drop_last=shuffle)
        self.image_ids = [int(i) + 1 for i in self.order]  # coco_dict's ids

    @property
    def coco(self) -> dict:
        from pas.data import ANIMAL_MNIST_CLASSES
        return coco_dict(self.scenes, list(ANIMAL_MNIST_CLASSES))

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.images[idx], [self.targets[int(i)] for i in idx]


@torch.no_grad()
def segmentation_metrics(model: nn.Module, loader, spec) -> dict:
    """COCO mask and box AP and AP50 (%) of the model's detections on the loader's images, against its
    ground truth (`loader.coco`; `loader.image_ids` in the loader's order)."""
    was = model.training
    model.eval()
    anchors = anchor_boxes(spec)
    ids = iter(loader.image_ids)
    detections = []
    for images, _ in loader:
        for det in postprocess(model(images), spec, anchors):
            detections += detections_from_masks(next(ids), det["masks"].numpy(), det["labels"].numpy(),
                                                det["scores"].numpy())
    model.train(was)
    return coco_evaluate(loader.coco, detections)


def write_scene_set(folder: str | Path, scenes: Scenes, classes: list[str]) -> None:
    """`folder/annotations.json` (COCO) and `folder/images/NNNNNN.png` (8-bit grayscale, the COCO
    file names), written whole or not at all."""
    from PIL import Image

    from pas.io import atomic_folder
    with atomic_folder(folder) as tmp:
        coco = coco_dict(scenes, classes)
        (tmp / "images").mkdir()
        for entry, image in zip(coco["images"], scenes.images):
            pixels = (image[0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(tmp / "images" / entry["file_name"], format="PNG")
        atomic_write_json(tmp / "annotations.json", coco)


class CocoLoader:
    """Evaluation batches of a scene folder (write_scene_set's, or any COCO folder of gray
    `canvas` x `canvas` images with RLE masks): (normalised images, None), image ids in `image_ids`."""

    def __init__(self, folder: str | Path, *, canvas: int, batch_size: int = 64):
        from PIL import Image
        folder = Path(folder)
        self.coco = read_coco(folder / "annotations.json", canvas=canvas)
        entries = sorted(self.coco["images"], key=lambda e: e["id"])
        images = []
        for e in entries:
            path = folder / "images" / str(e.get("file_name", ""))
            try:
                with Image.open(path) as img:
                    gray = np.asarray(img.convert("L"), dtype=np.float32) / 255
            except (OSError, ValueError) as err:
                raise PasError(f"{path}: image {e['id']} cannot be read ({err}); expected a PNG of the scene") from None
            if gray.shape != (canvas, canvas):
                raise PasError(f"{path}: image {e['id']} is {gray.shape[1]}x{gray.shape[0]}: expected {canvas}x{canvas}")
            images.append(gray)
        self.images = normalise(torch.from_numpy(np.stack(images))[:, None])
        self.image_ids = [e["id"] for e in entries]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            yield self.images[b * self.batch_size:(b + 1) * self.batch_size], None


class SegmentationTrainer(Trainer):
    """The engine's epochs, resume and logging with YOLACT's loss; validation is COCO AP."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.spec = model.spec
        self.anchors = anchor_boxes(self.spec).to(self.world.device)

    def validate(self) -> dict:
        return segmentation_metrics(self.model, self.val_loader, self.spec)

    def _train_epoch(self, epoch: int) -> dict:
        self.net.train()
        loader = self.train_loader(epoch)
        steps = len(loader)
        sums, n, macs, lr = {"loss": 0.0, "loss_classes": 0.0, "loss_boxes": 0.0, "loss_masks": 0.0}, 0, None, 0.0
        for step, (x, targets) in enumerate(loader):
            lr = self.optim_cfg.lr_at(epoch, step, steps, self.epochs)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss, parts = yolact_loss(self.net(x.to(self.world.device)), targets, self.spec, self.anchors)
            total, macs = self.penalised(loss, epoch, step, lr, macs)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            k = len(x)
            n += k
            sums["loss"] += float(loss.detach()) * k
            for name, v in parts.items():
                sums[f"loss_{name}"] += float(v.detach()) * k
            if self.on_step is not None and self.world.main:
                self.on_step(epoch, step, macs)
        return self.epoch_row(sums, n, lr, macs)


SAMPLES = 8  # validation scenes in each model's samples.png
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def _painted(image: np.ndarray, masks) -> np.ndarray:
    """The gray scene (H, W) in [0, 1] as RGB with every mask painted in its own colour, half opaque."""
    rgb = np.repeat((image * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
    for j, m in enumerate(masks):
        rgb[m] = 0.5 * rgb[m] + 0.5 * _PALETTE[j % len(_PALETTE)]
    return rgb.round().astype(np.uint8)


@torch.no_grad()
def sample_grid(model: nn.Module, scenes: Scenes, n: int = SAMPLES) -> np.ndarray:
    """The first `n` validation scenes as RGB uint8 (3 H, n W): the scenes, the model's detections'
    masks (score > 0.3) painted on them, the true instances painted on them, one row each."""
    model.eval()
    images = scenes.images[:n]
    detections = postprocess(model(normalise(images)), model.spec, anchor_boxes(model.spec))
    rows = [[_painted(img[0].numpy(), []) for img in images],
            [_painted(img[0].numpy(), det["masks"][det["scores"] > 0.3].numpy()) for img, det in zip(images, detections)],
            [_painted(img[0].numpy(), [i.mask for i in inst]) for img, inst in zip(images, scenes.instances[:n])]]
    return np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)


def save_samples(model: nn.Module, scenes: Scenes, path) -> None:
    from PIL import Image

    from pas.io import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(sample_grid(model, scenes)).save(tmp, format="PNG")


def add_subcommand(sub) -> None:
    p = sub.add_parser("scenes", help="write composed scenes as a COCO folder (annotations.json, images/)")
    p.add_argument("--split", choices=("train", "val"), default="val", help="whose silhouettes compose them")
    p.add_argument("--count", type=int, required=True, help="number of scenes")
    p.add_argument("--canvas", type=int, default=64, help="side in pixels")
    p.add_argument("--val-fraction", type=float, default=0.2, help="dataset.val_fraction of the run")
    p.add_argument("--split-seed", type=int, default=0, help="dataset.split_seed of the run (also the scenes' seed)")
    p.add_argument("--out-dir", required=True, help="the folder to write (replaced whole)")

    def run(args) -> int:
        from pas.data import ANIMAL_MNIST_CLASSES
        _check_positive("--count", args.count)
        scenes = scenes_from_dataset(args.split, count=args.count, canvas=args.canvas, val_fraction=args.val_fraction,
                                     split_seed=args.split_seed, seed=args.split_seed)
        write_scene_set(args.out_dir, scenes, list(ANIMAL_MNIST_CLASSES))
        return 0
    p.set_defaults(func=run)
