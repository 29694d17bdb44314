# Config checks that stop a run before any job, with one line naming the key. Included by the
# Snakefile before `validate` (which fills the defaults) and before the rules.

from pathlib import Path

import jsonschema
import yaml

import pas.models
from pas.errors import PasError
from pas.search import latency_target, resolve_target

# Shape of each dataset's images (in_channels, num_classes, side); `folder` is read from its root.
DATASET_SHAPES = {"animal_mnist": (1, 10, 28), "digits": (1, 10, 8), "cifar10": (3, 10, 32),
                  "cifar100": (3, 100, 32), "imagenet": (3, 1000, 224)}
DATASETS_WITH_ROOT = ("cifar10", "cifar100", "imagenet", "folder")


def config_error(key, message):
    """Stop with one line. Snakemake prints a raised WorkflowError with a file/line header and a
    traceback line; a SystemExit message is printed alone, on one line."""
    raise SystemExit(f"config error: {key}: {message}")


def check_schema(cfg, basedir, schema_path):
    """Wrong types and unknown keys, named by their dotted path (Snakemake's `validate` prints
    the whole schema excerpt over many lines)."""
    schema = yaml.safe_load((Path(basedir) / schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = list(validator.iter_errors(cfg))
    if errors:
        e = jsonschema.exceptions.best_match(errors)
        key = config_key(e.absolute_path)
        if e.validator == "additionalProperties":
            extra = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            config_error(config_key([*e.absolute_path, extra[0]]), f"unknown key; expected one of "
                                                f"{', '.join(sorted(e.schema.get('properties', {})))}")
        config_error(key, e.message)


def config_key(path):
    """('variants', 0, 'target') -> 'variants[0].target'."""
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key or "(top level)"


def dataset_shape(cfg):
    """(in_channels, num_classes, resolution) of the configured dataset, or None if unknown yet
    (a `folder` dataset whose root is not there: the data check reports it before a real run)."""
    d = cfg["dataset"]
    if d["name"] in DATASET_SHAPES:
        channels, classes, side = DATASET_SHAPES[d["name"]]
        if cfg["task"] == "segmentation":  # scenes composed of the images
            return channels, classes, cfg["segmentation"]["canvas"]
        return channels, classes, d["resize"] or side
    train = Path(str(d["root"])) / "train"
    if d["root"] is None or not train.is_dir() or d["resize"] is None:
        return None
    classes = sum(1 for e in train.iterdir() if e.is_dir())
    return d["in_channels"] or 3, classes, d["resize"]


def network_arch(cfg, backbone):
    shape = dataset_shape(cfg)
    if shape is None:
        return None
    channels, classes, side = shape
    if cfg["task"] == "translation":  # a generator writes an image of the input's channels
        classes = channels
    return pas.models.arch_for(backbone, num_classes=classes, in_channels=channels, resolution=side)


def check_config(cfg):
    """What the schema cannot say: registered names, reachable targets, unique names."""
    known = pas.models.names()
    seen = set()
    for i, v in enumerate(cfg["variants"]):
        key = f"variants[{i}]"
        if v["name"] in seen:
            config_error(f"{key}.name", f"variant name {v['name']!r} is used more than once; names must be unique")
        seen.add(v["name"])
        if not pas.models.is_backbone(v["backbone"]):
            config_error(f"{key}.backbone", f"unknown backbone {v['backbone']!r}; known: {', '.join(known)}, "
                                            f"torchvision:NAME or module.path:function")
        try:
            arch = network_arch(cfg, v["backbone"])
        except PasError as e:
            config_error(f"{key}.backbone", f"{e} (dataset {cfg['dataset']['name']}, resize {cfg['dataset']['resize']})")
        try:
            if latency_target(v["target"]) is not None:  # its range is known once the table is measured
                if dataset_shape(cfg) is None:
                    config_error(f"{key}.target", f"{v['name']}: a latency target needs the dataset's image shape "
                                                  f"to measure the latency table; expected dataset.resize")
            elif arch is not None:
                resolve_target(v["target"], arch, cfg["search"]["min_channels"],
                               v.get("channel_multiple", cfg["search"]["channel_multiple"]),
                               v.get("floor", cfg["search"]["floor"]))
        except PasError as e:
            config_error(f"{key}.target", f"{v['name']} on {v['backbone']}: {e}")
    if cfg["task"] == "translation":
        check_translation(cfg)
    if cfg["task"] == "segmentation":
        check_segmentation(cfg)
    scratch = cfg["references"]["scratch"]
    for i, name in enumerate(scratch):
        if not pas.models.is_backbone(name):
            config_error(f"references.scratch[{i}]", f"unknown network {name!r}; known: {', '.join(known)}")
        if name in scratch[:i]:
            config_error(f"references.scratch[{i}]", f"{name!r} is listed more than once")
    searched = {v["backbone"] for v in cfg["variants"]}
    for backbone, path in cfg["pretrain"]["weights"].items():
        if path is not None and backbone not in searched:  # null: no checkpoint (an override can say so)
            config_error(f"pretrain.weights.{backbone}", f"no variant uses backbone {backbone!r}")


def check_translation(cfg):
    """A translation run: generators as backbones, a dataset the domains are made from, a registered
    classifier, and no scratch rows (there is no family of smaller generators to train)."""
    from pas.translation import TRANSLATION_DATASETS
    if cfg["dataset"]["name"] not in TRANSLATION_DATASETS:
        config_error("dataset.name", f"task translation makes its domains from {' or '.join(TRANSLATION_DATASETS)}; "
                                     f"got {cfg['dataset']['name']!r}")
    for i, v in enumerate(cfg["variants"]):
        if pas.models.family_of(v["backbone"]) != "generator":
            config_error(f"variants[{i}].backbone", f"{v['backbone']!r} is not an image generator; task translation "
                                                    f"expects one of {', '.join(pas.models.GENERATORS)}")
    if cfg["references"]["scratch"]:
        config_error("references.scratch", "task translation has no scratch rows; expected []")
    backbone = cfg["translation"]["classifier"]["backbone"]
    if backbone not in pas.models.names():
        config_error("translation.classifier.backbone", f"unknown network {backbone!r}; expected a registered one")
    for b in cfg["baselines"]["methods"]:
        if b == "bn_gamma":
            config_error("baselines.methods", "bn_gamma ranks BatchNorm scales; a generator has instance norms "
                                              "without them: expected uniform and/or l1")


def check_segmentation(cfg):
    """A segmentation run: YOLACT backbones, scenes composed of the embedded silhouettes, no scratch rows."""
    if cfg["dataset"]["name"] != "animal_mnist":
        config_error("dataset.name", f"task segmentation composes its scenes from animal_mnist; got "
                                     f"{cfg['dataset']['name']!r}")
    for i, v in enumerate(cfg["variants"]):
        if pas.models.family_of(v["backbone"]) != "yolact":
            config_error(f"variants[{i}].backbone", f"{v['backbone']!r} is not an instance-segmentation network; "
                                                    f"task segmentation expects one of {', '.join(pas.models.DETECTORS)}")
    if cfg["references"]["scratch"]:
        config_error("references.scratch", "task segmentation has no scratch rows; expected []")


def check_data_paths(cfg):
    """Paths that must exist to run: checked in `onstart`, i.e. only for a real run, so a dry run
    of config/paper.yaml works on a machine without ImageNet."""
    d = cfg["dataset"]
    if d["name"] in DATASETS_WITH_ROOT:
        if d["root"] is None:
            config_error("dataset.root", f"dataset {d['name']!r} needs a root folder; set dataset.root")
        if not Path(d["root"]).is_dir():
            config_error("dataset.root", f"folder {d['root']!r} does not exist")
    for backbone, path in cfg["pretrain"]["weights"].items():
        if path is not None and not Path(path).is_file():
            config_error(f"pretrain.weights.{backbone}", f"checkpoint {path!r} does not exist")


