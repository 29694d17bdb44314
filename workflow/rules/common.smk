# Helpers shared by the rules: the models the workflow builds, input functions, each stage's config
# slice as `--set` flags, resources, wildcard constraints. No rule lives here. Included after the
# config has been checked and its defaults filled (see the Snakefile and checks.smk).
#
# Each job gets only the slice of the config its stage needs (as its `stage` param), so an edit
# to one variant reruns that variant's jobs and nothing else; the resolved stage config of every run
# is stored with it in MLflow (params) and its flags in the job's log header.

import os
import re
import shlex
from pathlib import Path

import yaml

# the methods of the table's rows, as pas names them
from pas.config import BASELINES as BASELINE_METHODS, REFERENCE_METHODS, SCRATCH_METHODS

RESULTS = "results"
# The report of `pas check-data` (rule check_data), for image-folder datasets only.
DATA_CHECK = f"{RESULTS}/data/check.json"
IMAGE_FOLDER_DATASETS = ("imagenet", "folder")
# Software of every shell rule with --use-conda; pip installs pas from PAS_SOURCE (see the env file).
PAS_ENV = "../envs/pas.yaml"
os.environ.setdefault("PAS_SOURCE", str(Path(workflow.basedir).resolve()))


# -- what the workflow builds ---------------------------------------------------------------

def variants():
    return {v["name"]: v for v in config["variants"]}


def seeds():
    """Every seed runs the whole pipeline, under results/seed<N>/."""
    return config["training"]["seeds"]


def backbones():
    """The searched backbones, in first-use order."""
    return list(dict.fromkeys(v["backbone"] for v in config["variants"]))


def models():
    """(method, model) of every row of the results table."""
    rows = [("pas", name) for name in variants()]
    rows += [(m, name) for m in config["baselines"]["methods"] for name, v in variants().items()
             if v.get("baselines", True)]
    if config["references"]["full"]:
        rows += [("full", b) for b in backbones()]
    rows += [("scratch", n) for n in config["references"]["scratch"]]
    if config["references"]["scratch_long"]:
        rows += [("scratch_long", n) for n in config["references"]["scratch"]]
    return rows


def model_backbone(method, model):
    return model if method in REFERENCE_METHODS else variants()[model]["backbone"]


def seed_dir(seed):
    return f"{RESULTS}/seed{seed}"


def model_dir(method, model, seed):
    return f"{seed_dir(seed)}/models/{method}/{model}"


def pretrain_dir(backbone, seed):
    return f"{seed_dir(seed)}/pretrain/{backbone}"


def masks_path(method, model, seed):
    """PaS: the search's masks; a baseline: pas prune's; a reference row: all ones."""
    d = model_dir(method, model, seed)
    return f"{d}/search/masks.json" if method == "pas" else f"{d}/masks.json"


def history_path(model, seed):
    return f"{model_dir('pas', model, seed)}/search/history.json"


def tracking_is_direct():
    return config["tracking"]["enabled"] and config["tracking"]["mode"] == "direct"


def tracking_is_ingest():
    return config["tracking"]["enabled"] and config["tracking"]["mode"] == "ingest"


def alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


# -- input functions -------------------------------------------------------------------------

def tracking_marker(wildcards=None):
    """Every stage that logs to MLflow waits for the store to exist (created once, no race)."""
    return f"{RESULTS}/mlflow/experiment.txt" if tracking_is_direct() else []


def is_image_folder():
    return config["dataset"]["name"] in IMAGE_FOLDER_DATASETS


def data_check(wildcards=None):
    """Every job that loads an image folder waits for its check (rule check_data); the embedded and
    CIFAR datasets have nothing to check and get no job."""
    return DATA_CHECK if is_image_folder() else []


def search_weights(wildcards):
    return f"{pretrain_dir(variants()[wildcards.model]['backbone'], wildcards.seed)}/weights.pt"


def finetune_start(wildcards):
    """PaS fine-tunes the searched weights; the baselines and the full row start from the pretrained
    network."""
    if wildcards.method == "pas":
        return f"{model_dir('pas', wildcards.model, wildcards.seed)}/search/weights.pt"
    if wildcards.method == "full":
        return f"{pretrain_dir(wildcards.model, wildcards.seed)}/weights.pt"
    return search_weights(wildcards)


def model_masks(wildcards):
    return masks_path(wildcards.method, wildcards.model, wildcards.seed)


def deploy_weights(wildcards):
    """Fine-tuned weights (the full backbone too: the same fine-tune epochs as every pruned network,
    so that extra epochs are not mistaken for the effect of pruning); a scratch member as trained."""
    d = model_dir(wildcards.method, wildcards.model, wildcards.seed)
    return f"{d}/train/weights.pt" if wildcards.method in SCRATCH_METHODS else f"{d}/finetune/weights.pt"


# -- stage config slices as --set flags --------------------------------------------------------

def set_flags(values, prefix=""):
    """{'optim': {'lr': 0.1}} -> "--set optim.lr=0.1"; every value written as YAML, shell-quoted.
    `tags` is one free-form mapping in the stage config: it goes as one flag (`--set tags={...}`),
    since each `--set tags.KEY=...` would replace the mapping the previous one set."""
    flags = []
    for key, value in sorted(values.items()):  # canonical: the order of keys in a config file is no change
        if isinstance(value, dict) and key != "tags":
            flags.append(set_flags(value, f"{prefix}{key}."))
        else:
            flags.append(f"--set {shlex.quote(f'{prefix}{key}={yaml_value(value)}')}")
    return " ".join(f for f in flags if f)


def yaml_value(value):
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-len("\n...")].strip() if text.endswith("\n...") else text


def dataset_slice():
    """The dataset section; for an image folder with the check-data report the stages read to skip
    unreadable files (dataset.bad_images), for the other datasets without that key (no checks)."""
    d = dict(config["dataset"])
    if is_image_folder():
        d["bad_images_report"] = DATA_CHECK
    else:
        d.pop("bad_images")
    return d


def common_slice(backbone, tags):
    """Keys every stage reads: dataset, run-wide settings, seed, MLflow, backbone, tags. In `ingest`
    mode the jobs log nothing to MLflow; they write run records that tracking_ingest replays."""
    training = {k: v for k, v in config["training"].items() if k != "seeds"}
    tracking = {k: v for k, v in config["tracking"].items() if k != "mode"}
    tracking["enabled"] = tracking_is_direct()
    # classification is the stages' default: its jobs' flags (and so their results) stay as they were
    task = {"task": config["task"]} if config["task"] != "classification" else {}
    if is_translation():
        task["translation"] = translation_losses()
    elif config["task"] == "segmentation":
        task["segmentation"] = config["segmentation"]
    return {"backbone": backbone, **training, "seed": int(tags["seed"]), "progress": False,
            "dataset": dataset_slice(), "tracking": tracking, "tags": tags, **task}


# -- the translation task (task: translation) ----------------------------------------------------

def is_translation():
    return config["task"] == "translation"


def translation_losses():
    t = config["translation"]
    return {k: t[k] for k in ("lambda_cycle", "lambda_identity")}


def classifier_dir():
    return f"{RESULTS}/classifier/{config['translation']['classifier']['backbone']}"


def classifier_weights(wildcards=None):
    """The classifier that judges translations (the classifier job): an input of every evaluation of a
    translation run, nothing otherwise."""
    return f"{classifier_dir()}/weights.pt" if is_translation() else []


def classifier_flags(wildcards=None):
    """pas pretrain of a classifier on the dataset's images: the classification task, seed 0."""
    c = config["translation"]["classifier"]
    tags = {"variant": "classifier", "model": c["backbone"], "method": "classifier", "seed": "0"}
    common = common_slice(c["backbone"], tags)
    common.pop("translation", None)
    return set_flags({**common, "task": "classification", "epochs": c["epochs"], "batch_size": c["batch_size"],
                      "optim": {"lr": c["lr"]}})


# -- the segmentation task (task: segmentation) --------------------------------------------------

SCENES = f"{RESULTS}/data/scenes/val"


def val_scenes(wildcards=None):
    """The validation scenes as a COCO folder (the scenes job): an input of every evaluation of a
    segmentation run, nothing otherwise."""
    return SCENES if config["task"] == "segmentation" else []


def scenes_flags(wildcards=None):
    """pas scenes' options for the run's validation scenes, each shell-quoted."""
    d, s = config["dataset"], config["segmentation"]
    return shlex.join(["--split", "val", "--count", str(s["val_scenes"]), "--canvas", str(s["canvas"]),
                       "--val-fraction", str(d["val_fraction"]), "--split-seed", str(d["split_seed"])])


# the first and last rows of the samples figure (the samples job), per task
SAMPLE_LABELS = {"translation": "contour silhouette", "segmentation": "scene truth"}


def samples_inputs(wildcards=None):
    """Every row's sample translations of the first seed (evaluate writes them beside eval.json)."""
    return [f"{model_dir(method, model, seeds()[0])}/samples.png" for method, model in models()]


def samples_flags(wildcards=None):
    """Every row's samples.png and the labels of the first and last rows, each shell-quoted."""
    names = [tags_for(m, model, seeds()[0])["variant"] for m, model in models()]
    flags = [f"--model {shlex.quote(f'{name}={path}')}" for name, path in zip(names, samples_inputs())]
    return " ".join(flags + [f"--labels {shlex.join(SAMPLE_LABELS[config['task']].split())}"])


def check_data_flags(wildcards=None):
    """What the check reads: the dataset's name and root, and whether bad files stop the run."""
    d = config["dataset"]
    return set_flags({"dataset": {k: d[k] for k in ("name", "root", "bad_images")}})


def tags_for(method, model, seed):
    """MLflow tags of every run of one row; `variant` names the row (and the MLflow run)."""
    reference = method in REFERENCE_METHODS
    name = model if method == "pas" or reference else f"{method}@{model}"
    if method == "scratch_long":
        name = f"{model}-{scratch_epochs(method)}ep"  # its own row and MLflow run next to the standard one
    if method == "full":
        target = "full"
    elif method in SCRATCH_METHODS:
        target = scratch_target(model)
    else:
        target = str(variants()[model]["target"])
    return {"variant": name, "model": model, "method": method, "target": target, "seed": str(seed)}


def scratch_target(model):
    """A scratch member's `target` tag: the target of the variants at its MACs (within 1%), so that
    filtering runs by a target finds the scratch reference with PaS and the baselines; else its own
    MACs; empty where the data's shape is known only at run time."""
    arch = network_arch(config, model)
    if arch is None:
        return ""
    macs = int(arch.macs())
    for v in variants().values():
        if latency_target(v["target"]) is not None:
            continue  # a latency budget matches no MACs figure
        searched = network_arch(config, v["backbone"])
        if abs(resolve_target(v["target"], searched) / macs - 1) <= 0.01:
            return str(v["target"])
    return str(macs)


def training_slice(section, epochs=None):
    s = config[section]
    return {"epochs": s["epochs"] if epochs is None else epochs, "batch_size": s["batch_size"], "optim": s["optim"]}


def pretrain_flags(wildcards):
    b = wildcards.backbone
    tags = {"variant": b, "model": b, "method": "pretrain", "seed": wildcards.seed}
    return set_flags({**common_slice(b, tags), **training_slice("pretrain")})


def scratch_epochs(method):
    """scratch: the backbone's schedule (the paper's reference members); scratch_long: PaS's total
    epochs (pretrain + search + fine-tune), the stricter reference."""
    if method == "scratch":
        return config["pretrain"]["epochs"]
    return sum(config[s]["epochs"] for s in ("pretrain", "search", "finetune"))


def scratch_flags(wildcards):
    """A smaller family member trained from scratch with the pretrain optimiser (scratch_epochs)."""
    m = wildcards.method
    return set_flags({**common_slice(wildcards.model, tags_for(m, wildcards.model, wildcards.seed)),
                      **training_slice("pretrain", scratch_epochs(m))})


def pretrain_import(wildcards):
    path = config["pretrain"]["weights"].get(wildcards.backbone)
    return f"--import {shlex.quote(path)}" if path else ""


def latency_table_path(backbone):
    return f"results/latency_tables/{backbone}.json"


def variant_latency_table(wildcards):
    """The latency table a variant with a latency target searches on (no input for a MACs target)."""
    v = variants()[wildcards.model]
    return [latency_table_path(v["backbone"])] if latency_target(v["target"]) is not None else []


def budget_slice(v):
    """The target, and the backbone's latency table for a latency target."""
    if latency_target(v["target"]) is None:
        return {"target": v["target"]}
    return {"target": v["target"], "latency_table": latency_table_path(v["backbone"])}


# search settings a variant may set for itself (its search; the last two for its baselines too)
VARIANT_SEARCH_KEYS = ("alpha", "penalty_gradient", "objective", "gain", "multiplier_lr", "ramp", "floor",
                       "channel_multiple", "tolerance")


def variant_search(v):
    """config["search"] with the variant's own settings (VARIANT_SEARCH_KEYS) in place."""
    return {**config["search"], **{k: v[k] for k in VARIANT_SEARCH_KEYS if k in v}}


def search_flags(wildcards):
    v = variants()[wildcards.model]
    s = variant_search(v)
    search = {k: s[k] for k in ("alpha", "min_channels", "tolerance", "channel_multiple", "penalty_gradient",
                                "objective", "gain", "multiplier_lr", "ramp", "floor", "history_every")}
    return set_flags({**common_slice(v["backbone"], tags_for("pas", wildcards.model, wildcards.seed)),
                      **training_slice("search"), "search": {**search, **budget_slice(v)}})


def prune_flags(wildcards):
    v = variants()[wildcards.model]
    s = variant_search(v)
    return set_flags({**common_slice(v["backbone"], tags_for(wildcards.method, wildcards.model, wildcards.seed)),
                      "search": {"method": wildcards.method, **budget_slice(v),
                                 "min_channels": s["min_channels"], "floor": s["floor"], "tolerance": s["tolerance"],
                                 "channel_multiple": s["channel_multiple"]}})


def latency_table_flags(wildcards):
    """pas latency-table's options (each shell-quoted): the backbone at the data's shape, the
    measurement's settings."""
    shape = dataset_shape(config)
    if shape is None:
        raise ValueError("a latency target needs the dataset's image shape: set dataset.resize")
    channels, classes, side = shape
    t = config["latency_table"]
    return shlex.join(["--backbone", wildcards.backbone, "--resolution", str(side), "--num-classes", str(classes),
                       "--in-channels", str(channels), "--channel-multiple", str(config["search"]["channel_multiple"]),
                       "--runtime", t["runtime"], "--device", t["device"], "--batch", str(t["batch"]),
                       "--threads", str(t["threads"]), "--points", str(t["points"]), "--rounds", str(t["rounds"])]
                      + (["--networks", str(t["networks"])] if t.get("networks") is not None else []))


def finetune_flags(wildcards):
    backbone = model_backbone(wildcards.method, wildcards.model)
    return set_flags({**common_slice(backbone, tags_for(wildcards.method, wildcards.model, wildcards.seed)),
                      **training_slice("finetune")})


def deploy_flags(wildcards):
    backbone = model_backbone(wildcards.method, wildcards.model)
    return set_flags(common_slice(backbone, tags_for(wildcards.method, wildcards.model, wildcards.seed)))


def evaluate_flags(wildcards):
    """Accuracy, MACs and params only: the latency job times every network side by side later. A
    translation is judged by the classifier (rule classifier)."""
    backbone = model_backbone(wildcards.method, wildcards.model)
    stage = {**common_slice(backbone, tags_for(wildcards.method, wildcards.model, wildcards.seed)),
             "evaluate": {"batch_sizes": []}}
    if is_translation():
        stage["translation"].update(classifier=classifier_weights(),
                                    classifier_backbone=config["translation"]["classifier"]["backbone"])
    if config["task"] == "segmentation":
        stage["segmentation"] = {**stage["segmentation"], "val_set": SCENES}
    return set_flags(stage)


def full_masks_flags(wildcards):
    """A reference row's all-ones masks (`pas prune`, method full): the network and dataset only."""
    return set_flags({**common_slice(wildcards.model, tags_for(wildcards.method, wildcards.model, wildcards.seed)),
                      "search": {"method": "full"}})


# -- resources ---------------------------------------------------------------------------------
# What each rule asks the scheduler for, from config["resources"]. Only `threads` matters to a local
# run; the rest becomes the sbatch line under profiles/slurm (snakemake-executor-plugin-slurm):
# runtime -> -t, mem_mb -> --mem, cpus_per_task -> --cpus-per-task, slurm_partition -> -p,
# nodes -> --nodes, gpu -> --gpus, gres -> --gres. `nproc_per_node` and `threads_per_rank` are read by
# the shell lines only: resources, not params, since they do not change a job's results and must
# not trigger a rerun.

def runtime_minutes(base):
    """The runtime resource: `base` minutes on the first attempt, attempt x base on a retry (a
    training retry resumes from its state file, a timed-out short job just gets longer), never past
    resources.max_runtime."""
    ceiling = config["resources"]["max_runtime"]

    def runtime(wildcards, attempt):
        minutes = base * attempt
        return min(minutes, ceiling) if ceiling else minutes
    return runtime


def partition(name):
    """slurm_partition only where one is configured: empty leaves the choice to the cluster (its
    default partition) or to a default-resources entry of the profile."""
    return {"slurm_partition": name} if name else {}


def gpu_request(gpus):
    """`gpu` (--gpus=N) or `gres` (--gres=gpu:N) as resources.gpu_request says; nothing without GPUs."""
    if not gpus:
        return {}
    return {"gpu": gpus} if config["resources"]["gpu_request"] == "gpu" else {"gres": f"gpu:{gpus}"}


def threads_per_rank(nproc):
    """Torch threads of each of a job's `nproc` processes: the job's CPUs shared out (a job of 32
    CPUs and 8 GPUs runs 8 processes of 4 threads, not 8 x 32). `threads` is the rule's thread
    count as the job gets it (lowered to --cores in a local run)."""
    def per_rank(wildcards, threads):
        return max(1, threads // nproc)
    return per_rank


def train_resources(rule_name):
    """A training job: one node (torchrun --standalone starts all processes on it), one process per
    GPU, the training partition, this rule's runtime."""
    r = config["resources"]["train"]
    nproc = max(1, r["gpus"])
    return {"runtime": runtime_minutes(r["runtime"][rule_name]), "mem_mb": r["mem_mb"],
            "cpus_per_task": r["threads"], "nodes": 1, **partition(r["partition"]),
            **gpu_request(r["gpus"]), "nproc_per_node": nproc, "threads_per_rank": threads_per_rank(nproc)}


def light_resources(threads=None):
    """A short CPU job in the light partition (`threads`: its CPUs, if not resources.light.threads)."""
    r = config["resources"]["light"]
    return {"runtime": runtime_minutes(r["runtime"]), "mem_mb": r["mem_mb"],
            "cpus_per_task": threads or r["threads"], **partition(r["partition"])}


def evaluate_resources():
    """Short-job resources with the CPUs of the latency measurement; with resources.evaluate.gpus
    one GPU (on one node) in the training partition, so latency is measured on a GPU as well."""
    gpus = config["resources"]["evaluate"]["gpus"]
    res = light_resources(EVAL_THREADS)
    if gpus:
        res.pop("slurm_partition", None)
        res.update(nodes=1, **partition(config["resources"]["train"]["partition"]), **gpu_request(gpus))
    return res


def whole_machine(wildcards):
    """A local run's every core (--cores), so that the job runs alone; on a cluster the job asks for a
    node of its own instead (LATENCY_RESOURCES)."""
    cores = workflow.resource_settings.cores
    return cores if isinstance(cores, int) and 0 < cores < 100_000 else EVAL_THREADS


# Evaluated once the config is complete: rules read these at definition time.
TRAIN_THREADS = config["resources"]["train"]["threads"]
LIGHT_THREADS = config["resources"]["light"]["threads"]
EVAL_THREADS = max(LIGHT_THREADS, config["evaluate"]["threads"])
LIGHT_RESOURCES = light_resources()
EVAL_RESOURCES = evaluate_resources()
# the latency job: the evaluation's request, on a node no other job shares
LATENCY_RESOURCES = {**EVAL_RESOURCES, "slurm_extra": "--exclusive"}


wildcard_constraints:
    seed=alternatives([str(s) for s in seeds()]),
    backbone=alternatives(backbones()),
    model=alternatives([*variants(), *backbones(), *config["references"]["scratch"]]),


# -- report inputs -------------------------------------------------------------------------------

def table_rows(wildcards=None):
    """One `--row` per network and seed, naming the files `pas tables` reads for it."""
    rows = []
    for seed in seeds():
        for method, model in models():
            d = model_dir(method, model, seed)
            files = {"eval": f"{d}/eval.json", "latency": LATENCY_JSON}
            if method == "full":
                files["train"] = f"{pretrain_dir(model, seed)}/metrics.json"
                files["finetune"] = f"{d}/finetune/metrics.json"
            elif method in SCRATCH_METHODS:
                files["train"] = f"{d}/train/metrics.json"
            else:
                files["masks"] = masks_path(method, model, seed)
                if method == "pas":
                    files["search"] = f"{d}/search/metrics.json"
                files["finetune"] = f"{d}/finetune/metrics.json"
            rows.append(files)
    return rows


LATENCY_JSON = "results/latency/latency.json"


def latency_name(method, model, seed):
    """How `pas latency` reports a table row's network: seed, method and model."""
    return f"seed{seed}/{method}/{model}"


def latency_inputs(wildcards=None):
    """Every deployed network of every seed: the one latency job times them all side by side."""
    return [f"{deployed_dir(method, model, seed)}/{name}" for seed in seeds() for method, model in models()
            for name in ("arch.json", "model.safetensors")]


def deployed_dir(method, model, seed):
    return f"{model_dir(method, model, seed)}/deploy"


def latency_flags(wildcards=None):
    e = config["evaluate"]
    flags = [f"--model {shlex.quote(f'{latency_name(method, model, seed)}={deployed_dir(method, model, seed)}')}"
             for seed in seeds() for method, model in models()]
    flags += [f"--batch-sizes {' '.join(str(b) for b in e['batch_sizes'])}", f"--rounds {e['repeats']}",
              f"--warmup {e['warmup']}", f"--threads {e['threads']}", f"--runtimes {' '.join(e['runtimes'])}"]
    return " ".join(flags)


def table_files(wildcards=None):
    return list(dict.fromkeys(path for row in table_rows() for path in row.values()))


def table_flags(wildcards=None):
    specs = (",".join(f"{k}={v}" for k, v in row.items()) for row in table_rows())
    return " ".join(f"--row {shlex.quote(spec)}" for spec in specs)


def history_files(seed):
    return [history_path(name, seed) for name in variants()]


def plot_inputs(wildcards=None):
    """The figures show the first seed's run; results/evidence aggregates every seed."""
    return history_files(seeds()[0])


def history_flags(wildcards=None):
    pairs = zip(variants(), history_files(seeds()[0]))
    return " ".join(f"--history {shlex.quote(f'{name}={path}')}" for name, path in pairs)


def evidence_runs(wildcards=None):
    """The masks (and a PaS search history) of every pruned row of every seed."""
    runs = []
    for seed in seeds():
        for method, model in models():
            if method in REFERENCE_METHODS:
                continue
            run = {"method": method, "model": model, "seed": str(seed), "masks": masks_path(method, model, seed)}
            if method == "pas":
                run["history"] = history_path(model, seed)
            runs.append(run)
    return runs


def evidence_files(wildcards=None):
    return [r[k] for r in evidence_runs() for k in ("masks", "history") if k in r]


def evidence_flags(wildcards=None):
    specs = (",".join(f"{k}={v}" for k, v in r.items()) for r in evidence_runs())
    return " ".join(f"--run {shlex.quote(spec)}" for spec in specs)
