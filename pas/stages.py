"""The stages the workflow runs: pretrain, search, prune, finetune, deploy, evaluate.

Each stage reads a stage config (YAML/JSON + `--set key=value`), writes its declared outputs
atomically once it has finished, keeps its resumable training state in a hidden file beside them,
and logs to MLflow when tracking is on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from pas.config import load_config
from pas.errors import PasError
from pas.io import atomic_write_json

STATE_SUFFIX = ".state.pt"
_ACTIVE_TRACKERS: list = []  # closed as FAILED if the stage raises (an MLflow run is never left RUNNING)


# -- shared set-up ---------------------------------------------------------------------------

def _setup(cfg: dict):
    from pas.engine import env_world
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    world = env_world()
    if world.size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if world.device.type == "cuda" else "gloo")
    torch.manual_seed(cfg["seed"])
    return world


def _excluded_files(d: dict) -> list[str]:
    """With dataset.bad_images=skip: the unreadable files the check-data report lists (stop: none,
    the check itself stopped on them)."""
    from pas.datacheck import IMAGE_FOLDER_DATASETS, check_policy, report_exclusions
    if check_policy(d) != "skip" or str(d["name"]).lower().replace("-", "_") not in IMAGE_FOLDER_DATASETS:
        return []
    if not d["bad_images_report"]:
        raise PasError("dataset.bad_images 'skip' needs dataset.bad_images_report: expected the JSON report "
                       "written by pas check-data")
    return report_exclusions(d["bad_images_report"], d["name"], d["root"])


def _data_inputs(cfg: dict) -> tuple[str, ...]:
    """Files the data depends on beyond the config: the report whose files are skipped."""
    d = cfg["dataset"]
    return (d["bad_images_report"],) if d["bad_images"] == "skip" and d["bad_images_report"] else ()


def _is_translation(cfg: dict) -> bool:
    return cfg["task"] == "translation"


def _data(cfg: dict, world, *, augment: bool = True):
    if _is_translation(cfg):
        return _translation_data(cfg, world)
    if cfg["task"] == "segmentation":
        return _segmentation_data(cfg, world)
    from pas.data import load_data, make_loader
    d = cfg["dataset"]
    exclude = _excluded_files(d)
    train, val, info = load_data(d["name"], root=d["root"], val_fraction=d["val_fraction"],
                                 seed=d["split_seed"], resize=d["resize"], augment=augment,
                                 max_train=d["max_train"], max_val=d["max_val"], in_channels=d["in_channels"],
                                 exclude=exclude)
    if exclude and world.main:
        print(f"[data] skipped {info.skipped} unreadable images listed in {d['bad_images_report']} "
              f"(dataset.bad_images=skip): {info.train_size} train, {info.val_size} val images",
              file=sys.stderr, flush=True)
    per_rank = max(1, cfg["batch_size"] // world.size)

    def train_loader(epoch: int):
        return make_loader(train, batch_size=per_rank, shuffle=True, seed=cfg["seed"], epoch=epoch,
                           drop_last=len(train) > per_rank, rank=world.rank, world_size=world.size,
                           num_workers=cfg["workers"])

    val_loader = make_loader(val, batch_size=max(per_rank, 256), shuffle=False, num_workers=cfg["workers"])
    return train_loader, val_loader, info


def _translation_data(cfg: dict, world):
    """The unpaired domains of pas.translation (no augmentation: the contour is computed from the
    image as it is); the validation loader holds the TranslationData (`.data`)."""
    from pas.data import load_data
    from pas.translation import PairedLoader, UnpairedLoader, translation_data
    if world.size > 1:
        raise PasError("task translation trains in one process; expected --nproc-per-node 1")
    d = cfg["dataset"]
    train, val, info = load_data(d["name"], root=d["root"], val_fraction=d["val_fraction"], seed=d["split_seed"],
                                 resize=d["resize"], augment=False, max_train=d["max_train"], max_val=d["max_val"],
                                 in_channels=d["in_channels"])
    data = translation_data(train, val, info, split_seed=d["split_seed"])

    def train_loader(epoch: int):
        return UnpairedLoader(data.train_a, data.train_b, batch_size=cfg["batch_size"], seed=cfg["seed"], epoch=epoch)
    return train_loader, PairedLoader(data), info


def _segmentation_data(cfg: dict, world):
    """Scenes composed from the embedded silhouettes (pas.segmentation), the same for every run of a
    split seed; the validation loader holds them (`.scenes`) for COCO's evaluation."""
    from pas.data import ANIMAL_MNIST_CLASSES, DataInfo
    from pas.segmentation import SceneLoader, scenes_from_dataset
    d, s = cfg["dataset"], cfg["segmentation"]
    if d["name"] != "animal_mnist":
        raise PasError(f"task segmentation composes its scenes from the embedded animal_mnist; got dataset "
                       f"{d['name']!r}")
    if world.size > 1:
        raise PasError("task segmentation trains in one process; expected --nproc-per-node 1")
    common = dict(canvas=s["canvas"], val_fraction=d["val_fraction"], split_seed=d["split_seed"], seed=d["split_seed"])
    train = scenes_from_dataset("train", count=s["train_scenes"], **common)
    val = scenes_from_dataset("val", count=s["val_scenes"], **common)
    info = DataInfo(name="animal_mnist_scenes", in_channels=1, num_classes=len(ANIMAL_MNIST_CLASSES),
                    resolution=s["canvas"], train_size=len(train), val_size=len(val),
                    classes=list(ANIMAL_MNIST_CLASSES), mean=(0.5,), std=(0.5,))

    def train_loader(epoch: int):
        return SceneLoader(train, batch_size=cfg["batch_size"], seed=cfg["seed"], epoch=epoch)
    return train_loader, SceneLoader(val, batch_size=64, shuffle=False), info


def _searched(model):
    """The network whose widths are searched: the model itself, or a CycleGAN's generator G."""
    from pas.translation import CycleGAN
    return model.g if isinstance(model, CycleGAN) else model


def _model(cfg: dict, info, world):
    from pas.models import build
    if _is_translation(cfg):
        from pas.translation import build_cyclegan
        return build_cyclegan(cfg["backbone"], channels=info.in_channels, resolution=info.resolution).to(world.device)
    if cfg["task"] == "segmentation":
        from pas.models import family_of
        if family_of(cfg["backbone"]) != "yolact":
            raise PasError(f"backbone {cfg['backbone']!r} is not an instance-segmentation network; expected "
                           f"yolact_mini for task segmentation")
    model = build(cfg["backbone"], num_classes=info.num_classes, in_channels=info.in_channels,
                  resolution=info.resolution)
    if world.size > 1 and cfg["sync_bn"] and world.device.type == "cuda":  # SyncBatchNorm is GPU-only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world.device.type == "cuda" and cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model.to(world.device)


def _weights_only(model) -> dict:
    """Training-form weights without gates: masks travel in masks.json."""
    from pas.gates import GATES_ATTR
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if GATES_ATTR not in k.split(".")}


def _load_weights(model, path: str) -> None:
    from pas.checkpoints import load_checkpoint
    load_checkpoint(path, model)


def _import_weights(model, path: str, tracker, world) -> bool:
    """A checkpoint into the backbone (official/timm/torchvision/our names). One trained for another
    class count (ImageNet weights on one's own data) loads with a fresh classifier, said in one log
    line and in MLflow; then the backbone still needs training on this data: True."""
    from pas.checkpoints import load_weights
    loaded = load_weights(path, model, new_classifier=True)
    if world.main:
        print(f"[pretrain] {loaded.message(path)}", file=sys.stderr, flush=True)
    tracker.tags({"import.path": str(path), "import.format": loaded.format,
                  "import.new_classifier": loaded.new_classifier or "",
                  "import.checkpoint_classes": str(loaded.checkpoint_classes or loaded.classes or "")})
    return loaded.new_classifier is not None


def _progress(cfg) -> bool:
    return sys.stderr.isatty() if cfg["progress"] is None else cfg["progress"]


def _epoch_logger(tracker, stage: str, epochs: int):
    def log(epoch, row):
        parts = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
        print(f"[{stage}] epoch {epoch}/{epochs} {parts}", file=sys.stderr, flush=True)
        tracker.metrics(row, step=epoch)
    return log


def _tracker(cfg, stage: str, world, primary_output: str, info=None, *, weights_in=None, weights_out=None):
    """The stage's MLflow run; its plain record lands beside the primary output as *.run.json.
    The weights it reads and writes link it to the run before it and the pretraining behind it.
    Images dropped as unreadable (dataset.bad_images=skip) are its metric `skipped_images`."""
    from pas.tracking import Tracker
    name = f"{cfg['tags'].get('variant', cfg['backbone'])} seed{cfg['seed']}/{stage}"
    record = _record_path(Path(primary_output))
    tracker = Tracker(cfg, stage=stage, run_name=name, enabled=world.main, record_path=record,
                      weights_in=weights_in, weights_out=weights_out)
    _ACTIVE_TRACKERS.append(tracker)
    if info is not None and info.skipped:
        tracker.metrics({"skipped_images": info.skipped}, step=0)
    return tracker


def _masks_record(arch, masks, **extra) -> dict:
    return {"family": arch.family, "backbone": arch.backbone, "in_channels": arch.in_channels,
            "num_classes": arch.num_classes, "resolution": arch.resolution, "groups": arch.group_names(),
            "widths": [int(m.sum()) for m in masks],
            "kept_fractions": [round(int(m.sum()) / len(m), 6) for m in masks],
            "full_widths": arch.searchable_widths(), "layer_sizes": arch.searchable_sizes(),
            "full_macs": int(arch.macs()),
            "macs": int(arch.macs([int(m.sum()) for m in masks])),
            "masks": [[int(v) for v in m.tolist()] for m in masks], **extra}


def _fraction_metrics(record: dict) -> dict:
    """Each searched group's kept fraction (MLflow metrics kept_fraction_NN) and the smallest."""
    fractions = record["kept_fractions"]
    return {**{f"kept_fraction_{i:02d}": f for i, f in enumerate(fractions)},
            "kept_fraction_min": min(fractions, default=1.0)}


def _read_masks(path: str) -> list[torch.Tensor]:
    try:
        data = json.loads(Path(path).read_text())
        return [torch.tensor(m, dtype=torch.bool) for m in data["masks"]]
    except FileNotFoundError:
        raise PasError(f"masks file {path!r} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PasError(f"masks file {path!r} is malformed ({e}); expected the JSON written by "
                       f"pas search or pas prune") from None


def _check_masks(model, masks, path):
    model = _searched(model)
    widths = model.arch.searchable_widths()
    if [len(m) for m in masks] != widths:
        raise PasError(f"masks file {path!r} has layer widths {[len(m) for m in masks]}, but "
                       f"{type(model).__name__} needs {widths}")


def _state_path(out: str) -> Path:
    p = Path(out)
    return p.with_name(f".{p.name}{STATE_SUFFIX}")


# Stage config keys that do not change what a stage computes: a changed one keeps a training state.
_NOT_RESULTS = ("threads", "progress", "tracking", "tags", "workers")


def _fingerprint(cfg: dict, *inputs: str | None) -> str:
    """What a training state is written for: the stage config (less _NOT_RESULTS) and the bytes of
    its input files. A state left by a killed run of another config or input is not resumed."""
    h = hashlib.sha256(json.dumps({k: v for k, v in cfg.items() if k not in _NOT_RESULTS}, sort_keys=True,
                                  default=str).encode())
    for path in inputs:
        if path:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _check_writable(*outputs: str) -> None:
    for out in outputs:
        parent = Path(out).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PasError(f"output folder {str(parent)!r} cannot be created: {e.strerror}") from None
        if not os.access(parent, os.W_OK):
            raise PasError(f"output folder {str(parent)!r} is not writable")
        _remove_leftovers(Path(out))


def _record_path(primary: Path) -> Path:
    """Where a stage's run record lands: beside its primary output, or inside an output folder."""
    return primary / "run.json" if primary.suffix == "" else primary.with_name(f"{primary.stem}.run.json")


def _remove_leftovers(out: Path) -> None:
    """Temporary files of atomic writes that a killed attempt (kill -9, scancel, a lost node) left
    beside this output, its training state and its run record (`.NAME.XXXX.tmp`), and deploy's
    temporary folder (`.deploy.XXXX/`), never renamed: the job now starting is their only writer."""
    for name in (out.name, _state_path(str(out)).name, _record_path(out).name):
        for leftover in out.parent.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    for leftover in out.parent.glob(f".{out.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _trainer_class(cfg, model):
    """What trains `model`: the engine's Trainer (cross-entropy), or CycleGAN's two updates per step."""
    from pas.engine import Trainer
    if cfg["task"] == "segmentation":
        from pas.segmentation import SegmentationTrainer
        return lambda **kw: SegmentationTrainer(model, **kw)
    if not _is_translation(cfg):
        return lambda **kw: Trainer(model, **kw)
    from pas.translation import CycleGANTrainer
    t = cfg["translation"]
    return lambda **kw: CycleGANTrainer(model, lambda_cycle=t["lambda_cycle"], lambda_identity=t["lambda_identity"],
                                        **kw)


def _trainer(cfg, model, stage: str, tracker, state, train_loader, val_loader, world, inputs=()):
    from pas.engine import OptimConfig
    return _trainer_class(cfg, model)(train_loader=train_loader, val_loader=val_loader, epochs=cfg["epochs"],
                   optim=OptimConfig(**cfg["optim"]), seed=cfg["seed"], state_path=state,
                   fingerprint=_fingerprint(cfg, *inputs, *_data_inputs(cfg)),
                   on_epoch=_epoch_logger(tracker, stage, cfg["epochs"]), world=world, amp=cfg["amp"],
                   progress=_progress(cfg))


def _training_metrics(cfg, stage: str, rows: list[dict], t0: float, **extra) -> dict:
    final = rows[-1] if rows else {}
    task = {f"final_{k}": final.get(k) for k in TASK_METRICS.get(cfg["task"], ())}
    from pas.machine import machine_record
    return {"stage": stage, "backbone": cfg["backbone"], "epochs": cfg["epochs"], **extra, **task,
            "final_top1": final.get("top1"), "final_top5": final.get("top5"),
            "wall_seconds": time.perf_counter() - t0, "machine": machine_record(), "history": rows}


def _finish_training(tracker, out_weights, model, metrics_path, metrics, state_path, artifacts=()):
    from pas.io import atomic_torch_save
    atomic_torch_save(_weights_only(model), out_weights)
    atomic_write_json(metrics_path, metrics)
    for a in artifacts:
        tracker.artifact(a)
    tracker.artifact(metrics_path)
    # after the last epoch's step: MLflow shows these (the final masks' MACs, not the last epoch's
    # gated MACs) as the run's values
    tracker.metrics({k: v for k, v in metrics.items() if k.startswith(("final_", "wall_", "macs", "target"))},
                    step=int(metrics.get("epochs") or 0) + 1)
    tracker.finish(True)
    Path(state_path).unlink(missing_ok=True)


# What a task's validation reports besides (or, for segmentation, instead of) top-1/top-5.
TASK_METRICS = {"translation": ("val_l1", "psnr"), "segmentation": ("mask_ap", "mask_ap50", "box_ap", "box_ap50")}


# -- stages ----------------------------------------------------------------------------------

def pretrain(cfg: dict, *, out_weights: str, out_metrics: str, import_path: str | None = None) -> dict:
    """Train the full training-form backbone, or import official/timm weights into it."""
    _check_writable(out_weights, out_metrics)
    world = _setup(cfg)
    train_loader, val_loader, info = _data(cfg, world)
    model = _model(cfg, info, world)
    tracker = _tracker(cfg, "pretrain", world, out_metrics, info, weights_out=out_weights)
    t0 = time.perf_counter()
    state = _state_path(out_weights)
    trained = not import_path
    if import_path:
        if _is_translation(cfg):
            raise PasError("pas pretrain --import reads classification checkpoints; expected no --import for task "
                           "translation")
        trained = _import_weights(model, import_path, tracker, world)
    if trained:
        rows = _trainer(cfg, model, "pretrain", tracker, state, train_loader, val_loader, world,
                        inputs=(import_path,)).fit()
    else:
        from pas.engine import evaluate
        rows = [evaluate(model, val_loader, world.device)]
    metrics = _training_metrics(cfg, "pretrain", rows, t0, macs=int(_searched(model).arch.macs()))
    if world.main:
        _finish_training(tracker, out_weights, model, out_metrics, metrics, state)
    return metrics


def search(cfg: dict, *, weights: str, out_weights: str, out_masks: str, out_history: str,
           out_metrics: str) -> dict:
    """Gates on, weights and gates trained jointly on CE + MACs penalty, masks landed on target."""
    from pas.engine import OptimConfig
    from pas.search import search as run_search
    _check_writable(out_weights, out_masks, out_history, out_metrics)
    world = _setup(cfg)
    train_loader, val_loader, info = _data(cfg, world)
    model = _model(cfg, info, world)
    _load_weights(model, weights)
    net = _searched(model)
    s = cfg["search"]
    from pas.search import resolve_budget  # a target the floor or the widths cannot reach: refused before any run
    resolve_budget(s["target"], net.arch, s["min_channels"], s["channel_multiple"], s["latency_table"], s["floor"])
    tracker = _tracker(cfg, "search", world, out_metrics, info, weights_in=weights, weights_out=out_weights)
    t0 = time.perf_counter()
    state = _state_path(out_weights)
    log_epoch = _epoch_logger(tracker, "search", cfg["epochs"])

    def on_epoch(epoch, row):  # the kept widths of every epoch, for the width curves in MLflow
        from pas.gates import kept_widths
        log_epoch(epoch, row)
        tracker.metrics({f"kept_{i:02d}": w for i, w in enumerate(kept_widths(net))}, step=epoch)

    result = run_search(_searched(model), train_loader, target=s["target"], epochs=cfg["epochs"],
                        optim=OptimConfig(**cfg["optim"]), alpha=s["alpha"], min_channels=s["min_channels"],
                        tolerance=s["tolerance"], channel_multiple=s["channel_multiple"],
                        penalty_gradient=s["penalty_gradient"], latency_table=s["latency_table"],
                        objective=s["objective"], floor=s["floor"], gain=s["gain"],
                        multiplier_lr=s["multiplier_lr"], ramp=s["ramp"],
                        history_every=s["history_every"], val_loader=val_loader,
                        seed=cfg["seed"], state_path=state, fingerprint=_fingerprint(cfg, weights, *_data_inputs(cfg)),
                        world=world, progress=_progress(cfg), trainer=_trainer_class(cfg, model),
                        on_epoch=on_epoch)
    wall = time.perf_counter() - t0
    if not world.main:
        return {}
    from pas.machine import machine_record
    landing = result.landing.record()
    record = _masks_record(net.arch, result.masks, **result.budget.record(),
                           searched_macs=result.searched_macs, method="pas", objective=s["objective"],
                           floor=s["floor"], channel_multiple=s["channel_multiple"], **landing)
    _warn_if_unconverged(result.landing)
    atomic_write_json(out_masks, record)
    atomic_write_json(out_history, {"layers": len(result.masks), "full_widths": net.arch.searchable_widths(),
                                    "layer_sizes": net.arch.searchable_sizes(),
                                    "target_macs": result.target_macs, "records": result.history})
    final = result.metrics[-1] if result.metrics else {}
    metrics = {"stage": "search", "backbone": cfg["backbone"], "epochs": cfg["epochs"],
               "target_macs": result.target_macs, "macs": result.macs, "searched_macs": result.searched_macs,
               **{k: record[k] for k in ("target_latency_ms", "predicted_latency_ms", "latency_table_batch")
                  if k in record},
               "widths": record["widths"], "kept_fractions": record["kept_fractions"],
               "final_top1": final.get("top1"), "final_top5": final.get("top5"),
               "wall_seconds": wall, "machine": machine_record(), "history": result.metrics}
    # the final (target-adjusted) widths, as the last point of each kept_NN curve
    tracker.metrics({f"kept_{i:02d}": w for i, w in enumerate(record["widths"])}, step=cfg["epochs"] + 1)
    tracker.metrics(_fraction_metrics(record), step=cfg["epochs"] + 1)
    # target_latency_ms goes with the run's other final values (_finish_training)
    tracker.metrics({**landing, **{k: record[k] for k in ("latency_table_batch",) if k in record}},
                    step=cfg["epochs"] + 1)
    _finish_training(tracker, out_weights, model, out_metrics, metrics, state, (out_masks, out_history))
    return metrics


# Above this share of the full network's MACs moved by the landing, the search had not converged.
UNCONVERGED_SHARE = 0.05


def _warn_if_unconverged(landing) -> None:
    if landing.moved_macs_share is not None and landing.moved_macs_share > UNCONVERGED_SHARE:
        print(f"[search] warning: the landing moved {landing.moved_macs_share:.1%} of the full network's MACs "
              f"({landing.macs_before} -> {landing.macs}, {landing.moved_channels} channels): the search did not "
              f"converge: more steps, or a larger search.gain (objective constraint) or alpha (paper)", file=sys.stderr, flush=True)


def prune(cfg: dict, *, weights: str | None, out_masks: str) -> dict:
    """Baseline masks (uniform, bn_gamma, l1) at the configured target, from pretrained weights;
    `full`: all-ones masks, so a reference network deploys through the same fuse + compact path
    (no weights needed, no MLflow run: the reference's deploy and evaluate runs are its record)."""
    from pas.pruners import run_pruner
    from pas.search import resolve_budget
    s = cfg["search"]
    if s["method"] != "full" and not weights:
        raise PasError(f"search.method {s['method']!r} ranks the channels of a trained network; expected "
                       f"--weights (the pretrained backbone)")
    _check_writable(out_masks)
    world = _setup(cfg)
    _, _, info = _data(cfg, world)
    model = _model(cfg, info, world)
    net = _searched(model)
    if s["method"] == "full":
        record = _masks_record(net.arch, [torch.ones(w, dtype=torch.bool) for w in net.arch.searchable_widths()],
                               method="full")
        atomic_write_json(out_masks, record)
        return record
    _load_weights(model, weights)
    budget = resolve_budget(s["target"], net.arch, s["min_channels"], s["channel_multiple"], s["latency_table"],
                            s["floor"])
    landing = run_pruner(s["method"], net, budget.target, channel_multiple=s["channel_multiple"],
                         tolerance=s["tolerance"], min_channels=s["min_channels"], floor=s["floor"],
                         cost=budget.cost(net.arch))
    record = _masks_record(net.arch, landing.masks, **budget.record(), method=s["method"], floor=s["floor"],
                           channel_multiple=s["channel_multiple"], **landing.record())
    tracker = _tracker(cfg, "prune", world, out_masks, weights_in=weights)  # a store that fails, fails before any output
    atomic_write_json(out_masks, record)
    targets = {k: v for k, v in budget.record().items()
               if k in ("target_macs", "target_latency_ms", "latency_table_batch") and v is not None}
    tracker.metrics({**targets, "macs": record["macs"], **_fraction_metrics(record),
                     **{k: v for k, v in landing.record().items() if v is not None}})
    tracker.artifact(out_masks)
    tracker.finish(True)
    return record


def finetune(cfg: dict, *, weights: str, masks: str, out_weights: str, out_metrics: str) -> dict:
    """Gates frozen at the given masks; the masked multi-branch network trains on CE only."""
    from pas.gates import freeze_gates, set_masks
    _check_writable(out_weights, out_metrics)
    world = _setup(cfg)
    train_loader, val_loader, info = _data(cfg, world)
    model = _model(cfg, info, world)
    _load_weights(model, weights)
    mask_list = _read_masks(masks)
    _check_masks(model, mask_list, masks)
    set_masks(_searched(model), mask_list)
    freeze_gates(_searched(model))
    tracker = _tracker(cfg, "finetune", world, out_metrics, info, weights_in=weights, weights_out=out_weights)
    t0 = time.perf_counter()
    state = _state_path(out_weights)
    rows = _trainer(cfg, model, "finetune", tracker, state, train_loader, val_loader, world,
                    inputs=(weights, masks)).fit()
    metrics = _training_metrics(cfg, "finetune", rows, t0,
                                macs=int(_searched(model).arch.macs([int(m.sum()) for m in mask_list])))
    if world.main:
        _finish_training(tracker, out_weights, model, out_metrics, metrics, state)
    return metrics


def deploy(cfg: dict, *, weights: str, masks: str, out_dir: str) -> dict:
    """Fuse + compact into a plain network: arch.json, model.safetensors, model.onnx, deploy.json."""
    from pas.compact import compact
    from pas.deploy import save_deployed
    from pas.gates import set_masks
    _check_writable(out_dir)
    world = _setup(cfg)
    _, _, info = _data(cfg, world, augment=False)
    model = _model(cfg, info, world).cpu()
    _load_weights(model, weights)
    model = _searched(model)  # a CycleGAN deploys its generator G
    mask_list = _read_masks(masks)
    _check_masks(model, mask_list, masks)
    set_masks(model, mask_list)
    model.eval()
    plain = compact(model).eval()
    x = torch.randn(2, info.in_channels, info.resolution, info.resolution)
    with torch.no_grad():
        reference = model(x)
        err = float((reference - plain(x)).abs().max() / reference.abs().max().clamp_min(1e-12))
    if not err <= 1e-3:  # a layer whose masked channels do not map to zero (e.g. a sigmoid after a gate)
        raise PasError(f"the compact {cfg['backbone']} differs from the masked one by {err:.2e} (relative); "
                       f"expected <= 1e-3: this network cannot lose its masked channels exactly")
    tracker = _tracker(cfg, "deploy", world, out_dir, weights_in=weights,  # a failing store fails before any output
                       weights_out=Path(out_dir) / "model.safetensors")
    record = save_deployed(plain, out_dir, compact_rel_err=err)
    for name in ("arch.json", "deploy.json", "model.onnx"):
        tracker.artifact(Path(out_dir) / name, "deployed")
    # a PaS variant is registered under its name (one version per seed and run); every deployed
    # network is a logged model
    t = cfg["tags"]
    normalization = {"mean": list(info.mean), "std": list(info.std)} if info.mean else None
    if cfg["task"] != "classification":  # a generator or a YOLACT reads images in [-1, 1]
        normalization = {"mean": [0.5] * info.in_channels, "std": [0.5] * info.in_channels}
    tracker.model(out_dir, normalization=normalization,
                  registered_name=t["variant"] if t.get("method") == "pas" and "variant" in t else None)
    tracker.metrics({"macs": record["macs"], "params": record["params"], "compact_rel_err": err})
    tracker.finish(True)
    return record


def evaluate(cfg: dict, *, arch: str, weights: str, out: str) -> dict:
    """Accuracy, MACs (analytic and ptflops), params and measured latency of a deployed network."""
    from pas.deploy import load_deployed
    from pas.evaluate import evaluate_deployed
    _check_writable(out)
    world = _setup(cfg)
    _, val_loader, info = _data(cfg, world, augment=False)
    model = load_deployed(arch, weights)
    a = model.arch
    outputs = info.in_channels if _is_translation(cfg) else info.num_classes  # a generator outputs an image
    if (a.in_channels, a.num_classes, a.resolution) != (info.in_channels, outputs, info.resolution):
        raise PasError(f"network {arch!r} takes {a.in_channels} channels/{a.num_classes} classes at "
                       f"{a.resolution}x{a.resolution}, dataset {info.name!r} has {info.in_channels}/"
                       f"{outputs} at {info.resolution}x{info.resolution}; expected the dataset "
                       f"the network was deployed for")
    e = cfg["evaluate"]
    quality, extra = None, {}
    if _is_translation(cfg):
        quality, extra = _translation_quality(cfg, val_loader, info, out)
    elif cfg["task"] == "segmentation":
        quality = _segmentation_quality(cfg, val_loader, out)
    result = evaluate_deployed(model, val_loader, batch_sizes=e["batch_sizes"], repeats=e["repeats"],
                               warmup=e["warmup"], threads=e["threads"], quality=quality)
    result.update(**extra)
    result.update(backbone=cfg["backbone"], **{k: v for k, v in cfg["tags"].items()})
    tracker = _tracker(cfg, "evaluate", world, out, weights_in=weights)  # a failing store fails before any output
    atomic_write_json(out, result)
    tracker.metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
    tracker.tags({"widths": " ".join(map(str, result["widths"]))})  # the table's widths (pas tables --from-mlflow)
    tracker.artifact(out)
    tracker.finish(True)
    return result


def _translation_quality(cfg, val_loader, info, out):
    """The translation metrics of a deployed generator, its sample translations (samples.png beside
    `out`) and the classifier's accuracy on the true silhouettes and raw contours (the two ends)."""
    from pas.models import build
    from pas.translation import reference_accuracy, save_samples, translation_metrics
    t = cfg["translation"]
    classifier = None
    if t["classifier"]:
        if not t["classifier_backbone"]:
            raise PasError("translation.classifier needs translation.classifier_backbone: expected the registered "
                           "network name the classifier was trained as")
        classifier = build(t["classifier_backbone"], num_classes=info.num_classes, in_channels=info.in_channels,
                           resolution=info.resolution)
        _load_weights(classifier, t["classifier"])
        classifier.eval()
    extra = reference_accuracy(classifier, val_loader.data) if classifier is not None else {}

    def quality(model):
        save_samples(model, val_loader.data, Path(out).with_name("samples.png"))
        return translation_metrics(model, val_loader, classifier=classifier, info=info)
    return quality, extra


def _segmentation_quality(cfg, val_loader, out):
    """COCO mask and box AP of a deployed YOLACT (on segmentation.val_set's COCO folder when given),
    and its predicted masks (samples.png beside `out`)."""
    from pas.segmentation import CocoLoader, save_samples, segmentation_metrics
    s = cfg["segmentation"]
    loader = CocoLoader(s["val_set"], canvas=s["canvas"]) if s["val_set"] else val_loader

    def quality(model):
        save_samples(model, val_loader.scenes, Path(out).with_name("samples.png"))
        return segmentation_metrics(model, loader, model.spec)
    return quality


# -- CLI wiring ------------------------------------------------------------------------------

def _common(p) -> None:
    p.add_argument("--config", help="stage config (YAML or JSON)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="train with DistributedDataParallel on N local processes")


def _run(fn, *names):
    def handler(args):
        import warnings
        # torch.load(weights_only=True) warns about the pickle protocol of a file it then refuses
        # (a PasError follows): keep the error the one line on stderr
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        cfg = load_config(args.config, args.overrides)  # bad configs fail once, before any launch
        if args.nproc_per_node > 1 and "RANK" not in os.environ:
            return _launch_distributed(args.nproc_per_node, getattr(args, "argv", sys.argv[1:]))
        kwargs = {n: getattr(args, n) for n in names}
        try:
            fn(cfg, **kwargs)
        except BaseException:
            for tracker in _ACTIVE_TRACKERS:
                tracker.finish(False)
            raise
        return 0
    return handler


def _launch_distributed(nproc: int, argv: list[str]) -> int:
    """Re-run this very command (`argv`, as the CLI was given it) under torchrun with N local processes."""
    from torch.distributed.run import main as torchrun
    argv = list(argv)
    i = argv.index("--nproc-per-node") if "--nproc-per-node" in argv else None
    if i is not None:
        del argv[i:i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "pas.cli", *argv])
    except ChildFailedError as e:  # the workers have reported their own errors on stderr
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1
    return 0


def add_subcommands(sub) -> None:
    """Register the stage subcommands on the CLI's subparsers."""
    p = sub.add_parser("pretrain", help="train (or import) the full training-form backbone")
    _common(p)
    p.add_argument("--out-weights", required=True)
    p.add_argument("--out-metrics", required=True)
    p.add_argument("--import", dest="import_path", help="official RepVGG / timm / pas checkpoint to import")
    p.set_defaults(func=_run(pretrain, "out_weights", "out_metrics", "import_path"))

    p = sub.add_parser("search", help="PaS search: DBC gates + MACs-target objective")
    _common(p)
    for flag in ("--weights", "--out-weights", "--out-masks", "--out-history", "--out-metrics"):
        p.add_argument(flag, required=True)
    p.set_defaults(func=_run(search, "weights", "out_weights", "out_masks", "out_history", "out_metrics"))

    p = sub.add_parser("prune", help="baseline masks (search.method: uniform, bn_gamma, l1; full: all ones)")
    _common(p)
    p.add_argument("--weights", help="the pretrained backbone (every method but full)")
    p.add_argument("--out-masks", required=True)
    p.set_defaults(func=_run(prune, "weights", "out_masks"))

    p = sub.add_parser("finetune", help="fine-tune the masked network (gates frozen, CE only)")
    _common(p)
    for flag in ("--weights", "--masks", "--out-weights", "--out-metrics"):
        p.add_argument(flag, required=True)
    p.set_defaults(func=_run(finetune, "weights", "masks", "out_weights", "out_metrics"))

    p = sub.add_parser("deploy", help="fuse + compact + export (arch.json, safetensors, ONNX)")
    _common(p)
    for flag in ("--weights", "--masks", "--out-dir"):
        p.add_argument(flag, required=True)
    p.set_defaults(func=_run(deploy, "weights", "masks", "out_dir"))

    p = sub.add_parser("evaluate", help="accuracy, MACs, params and latency of a deployed network")
    _common(p)
    for flag in ("--arch", "--weights", "--out"):
        p.add_argument(flag, required=True)
    p.set_defaults(func=_run(evaluate, "arch", "weights", "out"))

    p = sub.add_parser("tracking-init", help="create the MLflow store and experiment once")
    p.add_argument("--uri", default="sqlite:///results/mlflow.db")
    p.add_argument("--experiment", default="pas")
    p.add_argument("--artifact-root", default="results/mlflow-artifacts")
    p.set_defaults(func=_tracking_init)

    p = sub.add_parser("tracking-ingest", help="replay the stages' run records (*.run.json) into MLflow")
    p.add_argument("paths", nargs="+", help="run records, or folders searched for them")
    p.add_argument("--uri", default="sqlite:///results/mlflow.db")
    p.add_argument("--experiment", default="pas")
    p.add_argument("--artifact-root", default="results/mlflow-artifacts")
    p.set_defaults(func=_tracking_ingest)


def _tracking_ingest(args) -> int:
    from pas.tracking import ingest
    records = []
    for p in map(Path, args.paths):
        records += sorted(p.rglob("*.run.json")) + sorted(p.rglob("run.json")) if p.is_dir() else [p]
    print(ingest(records, uri=args.uri, experiment=args.experiment, artifact_root=args.artifact_root))
    return 0


def _tracking_init(args) -> int:
    from pas.tracking import init_store
    try:
        exp_id = init_store(args.uri, args.experiment, args.artifact_root)
    except Exception as e:  # a store path under a file, a database that is not MLflow's, ...
        raise PasError(f"MLflow store {args.uri!r} cannot be created: {str(e).splitlines()[0]}") from None
    print(exp_id)
    return 0
