"""Stage configs: one typed schema with defaults, read from YAML/JSON plus `--set key=value` overrides.

Every key has a type and a default; unknown keys and wrong types stop the stage before it starts,
with a one-line message naming the key.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from pas.errors import PasError

# The methods of a results table's rows (the `method` tag): PaS, the baselines pruned to a variant's
# target, and the reference rows: the full backbone (fine-tuned like every pruned network), smaller
# family members trained from scratch with the backbones' schedule, and the same for PaS's total
# epochs (stricter).
BASELINES = ("uniform", "bn_gamma", "l1")
SCRATCH_METHODS = ("scratch", "scratch_long")
REFERENCE_METHODS = ("full", *SCRATCH_METHODS)

# key: (type or tuple of types, default, description). Nested dicts are sections.
TASKS = ("classification", "translation", "segmentation")

SCHEMA: dict = {
    "task": (str, "classification", "classification | translation (a CycleGAN generator: pas.translation) | "
                                    "segmentation (a YOLACT network on composed scenes: pas.segmentation)"),
    "backbone": (str, "repvgg_b1_mini", "registered network name (pas info NAME)"),
    "seed": (int, 0, "seed of initialisation, data order and augmentation"),
    "epochs": (int, 10, "epochs of this stage"),
    "batch_size": (int, 256, "global batch size"),
    "threads": ((int, type(None)), None, "torch CPU threads (None: torch's default)"),
    "deterministic": (bool, False, "deterministic algorithms (exact resume on CPU)"),
    "workers": (int, 0, "data loader worker processes (image folders only)"),
    "amp": (bool, True, "mixed precision on CUDA (ignored on CPU)"),
    "channels_last": (bool, True, "channels_last memory format on CUDA (ignored on CPU)"),
    "sync_bn": (bool, False, "synchronised BN across processes when distributed (CUDA only; ignored on CPU)"),
    "progress": ((bool, type(None)), None, "tqdm progress bars (None: only on a terminal)"),
    "dataset": {
        "name": (str, "animal_mnist", "animal_mnist | digits | cifar10 | cifar100 | imagenet | folder"),
        "root": ((str, type(None)), None, "dataset folder (cifar, imagenet, folder)"),
        "val_fraction": (float, 0.2, "held-out fraction for datasets without a val split"),
        "split_seed": (int, 0, "seed of the train/val split (fixed across runs)"),
        "resize": ((int, type(None)), None, "resize images to this side"),
        "in_channels": ((int, type(None)), None, "force 1 (grayscale) or 3 (RGB) for image folders"),
        "max_train": ((int, type(None)), None, "stratified subset of the training split (tests)"),
        "max_val": ((int, type(None)), None, "stratified subset of the validation split (tests)"),
        "bad_images": (str, "stop", "stop | skip: unreadable images (pas check-data) stop the check, or are "
                                    "dropped from image folders by the training stages"),
        "bad_images_report": ((str, type(None)), None, "the pas check-data report whose files `skip` drops"),
    },
    "optim": {
        "lr": (float, 0.1, "initial learning rate"),
        "momentum": (float, 0.9, "SGD momentum"),
        "weight_decay": (float, 1e-4, "weight decay (gates included while searching)"),
        "schedule": (str, "cosine", "cosine | step | constant"),
        "milestones": (list, [0.5, 0.75], "step schedule: fractions of the epochs"),
        "gamma": (float, 0.1, "step schedule: factor at each milestone"),
        "gate_lr_scale": (float, 1.0, "lr of the DBC gate weights relative to the network's (search)"),
    },
    "search": {
        "target": ((str, int, float), "50%", "MACs target: '1.36G', '2.5M', '40%', 0.4 or an integer; or a "
                                             "latency '3.5ms' with latency_table"),
        "latency_table": ((str, type(None)), None, "table from pas latency-table: predicts a latency target"),
        "alpha": (float, 14.0, "scale-free penalty weight (paper's 0.1 in GMACs^-2 on B1 ~= 14)"),
        "min_channels": (int, 1, "channels every layer keeps at least"),
        "floor": (float, 0.1, "fraction of its full width every searched group keeps at least, in (0, 1] "
                              "(search, landing and every baseline)"),
        "objective": (str, "constraint", "constraint (quadratic term + learned Lagrange multiplier, landing by "
                                         "importance per cost) | paper (the paper's quadratic penalty, landing by "
                                         "gate weight)"),
        "gain": (float, 2.0, "objective constraint: the price per unit of distance to the budget"),
        "multiplier_lr": (float, 0.05, "objective constraint: the Lagrange multiplier's ascent rate per step"),
        "ramp": (float, 0.9, "objective constraint: fraction of the search steps over which the budget falls "
                             "from the full network's cost to the target (cubic schedule); 0: at once"),
        "tolerance": (float, 0.01, "allowed relative distance of the final MACs to the target"),
        "channel_multiple": (int, 1, "every searched width a multiple of it (8 or 16: hardware channel blocks)"),
        "penalty_gradient": (str, "both", "both | output: the MACs penalty's gradient flows through both widths "
                                          "of a layer, or only its output width (the authors' code)"),
        "history_every": (int, 10, "record kept widths and MACs every N steps"),
        "method": (str, "pas", "pas | uniform | bn_gamma | l1 (pas prune: full = all-ones masks)"),
    },
    "evaluate": {
        "batch_sizes": (list, [1, 64], "batch sizes for latency"),
        "repeats": (int, 20, "timed repeats (median reported)"),
        "warmup": (int, 5, "untimed warm-up runs"),
        "threads": (int, 1, "CPU threads for latency"),
    },
    "translation": {
        "lambda_cycle": (float, 10.0, "weight of the cycle-consistency L1 (CycleGAN's)"),
        "lambda_identity": (float, 0.5, "weight of the identity L1, relative to lambda_cycle (CycleGAN's)"),
        "classifier": ((str, type(None)), None, "weights of a classifier trained on the silhouettes (pas pretrain): "
                                                "evaluate reports its top-1 on the translations"),
        "classifier_backbone": ((str, type(None)), None, "the classifier's registered network name"),
    },
    "segmentation": {
        "canvas": (int, 64, "side of the composed scenes (a multiple of 32)"),
        "train_scenes": (int, 1000, "training scenes, composed from the training split's silhouettes"),
        "val_scenes": (int, 200, "validation scenes, from the validation split's silhouettes"),
        "val_set": ((str, type(None)), None, "a COCO folder (pas scenes) evaluate measures on instead of the "
                                             "composed validation scenes"),
    },
    "tracking": {
        "enabled": (bool, True, "log to MLflow (plain files are always written)"),
        "uri": (str, "sqlite:///results/mlflow.db", "MLflow tracking URI"),
        "experiment": (str, "pas", "MLflow experiment name"),
        "artifact_root": (str, "results/mlflow-artifacts", "artifact folder (made absolute)"),
    },
    "tags": (dict, {}, "extra MLflow tags (variant, target, ...)"),
}


def defaults(schema: dict = SCHEMA) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v[1]) for k, v in schema.items()}


_CHOICES = {"search.penalty_gradient": ("both", "output"), "search.objective": ("constraint", "paper"),
            "task": TASKS}
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join("null" if x is type(None) else x.__name__ for x in ts)


def _check(value, spec, key: str):
    types = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # YAML 1.1 (PyYAML) reads '1e-3' and '1e30' (no dot in the mantissa) as strings
    if float in types and str not in types and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise PasError(f"config key {key!r} must be {_type_name(spec[0])}, got {value!r}")
    if key in ("epochs", "batch_size", "search.history_every", "evaluate.repeats", "search.channel_multiple",
               "segmentation.canvas", "segmentation.train_scenes", "segmentation.val_scenes") \
            and value < (0 if key == "epochs" else 1):
        raise PasError(f"config key {key!r} must be {'>= 0' if key == 'epochs' else '>= 1'}, got {value!r}")
    if key == "search.floor" and not 0 < value <= 1:
        raise PasError(f"config key 'search.floor' must be in (0, 1] (a fraction of each group's width), "
                       f"got {value!r}")
    if key in ("search.multiplier_lr", "search.gain") and value < 0:
        raise PasError(f"config key {key!r} must be >= 0, got {value!r}")
    if key == "search.ramp" and not 0 <= value <= 1:
        raise PasError(f"config key 'search.ramp' must be in [0, 1] (a fraction of the search), got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise PasError(f"config key {key!r} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def merge(base: dict, update: dict, schema: dict = SCHEMA, prefix: str = "") -> dict:
    """Validated copy of `base` updated by `update`."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        full = f"{prefix}{key}"
        if key not in schema:
            raise PasError(f"unknown config key {full!r}; expected one of {', '.join(sorted(schema))}")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise PasError(f"config key {full!r} must be a mapping, got {value!r}")
            out[key] = merge(out[key], value, spec, f"{full}.")
        else:
            value = _check(value, spec, full)
            # free-form mappings (tags) accumulate: --set tags.a=1 --set tags.b=2 keeps both
            out[key] = {**out[key], **value} if isinstance(value, dict) else value
    return out


def parse_override(text: str) -> dict:
    """'optim.lr=0.05' -> {'optim': {'lr': 0.05}}; the value is read as YAML."""
    if "=" not in text:
        raise PasError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def named_values(texts: list[str], *, option: str, value: str) -> dict[str, str]:
    """Repeated NAME=VALUE options (`--model`, `--history`) as {NAME: VALUE}."""
    named = {}
    for text in texts:
        name, sep, v = text.partition("=")
        if not sep or not name or not v:
            raise PasError(f"{option} {text!r}: expected NAME={value}")
        named[name] = v
    return named


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = defaults()
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        except FileNotFoundError:
            raise PasError(f"config file {str(path)!r} does not exist") from None
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise PasError(f"config file {str(path)!r} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if data is not None and not isinstance(data, dict):
            raise PasError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        cfg = merge(cfg, data or {})
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}, for MLflow params."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "tags":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
