# The PaS chain: tracking_init -> pretrain(backbone) -> search(variant) -> finetune -> reparameterize
# -> evaluate. finetune, reparameterize and evaluate also serve the baselines and reference rows
# ({method} = pas, uniform, bn_gamma, l1, full, scratch, scratch_long), so every row goes through the
# same code.


rule tracking_init:
    """Create the MLflow store and experiment once, before jobs write to it in parallel."""
    output:
        marker="results/mlflow/experiment.txt",
    log:
        "results/mlflow/logs/tracking_init.log",
    benchmark:
        "results/mlflow/logs/tracking_init.benchmark.tsv"
    params:
        uri=lookup(dpath="tracking/uri", within=config),
        experiment=lookup(dpath="tracking/experiment", within=config),
        artifact_root=lookup(dpath="tracking/artifact_root", within=config),
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas tracking-init --uri {params.uri:q} --experiment {params.experiment:q} "
        "--artifact-root {params.artifact_root:q} > {output.marker} 2> {log}"


rule pretrain:
    """Train the full training-form backbone (or import a checkpoint: pretrain.weights)."""
    input:
        data_check=data_check,
        tracking=tracking_marker,
    output:
        weights="results/seed{seed}/pretrain/{backbone}/weights.pt",
        metrics="results/seed{seed}/pretrain/{backbone}/metrics.json",
    log:
        "results/seed{seed}/pretrain/{backbone}/logs/pretrain.log",
    benchmark:
        "results/seed{seed}/pretrain/{backbone}/logs/pretrain.benchmark.tsv"
    params:
        stage=pretrain_flags,
        checkpoint=pretrain_import,
    threads: TRAIN_THREADS
    resources:
        **train_resources("pretrain"),
    conda:
        PAS_ENV
    shell:
        "pas pretrain {params.stage} {params.checkpoint} --set threads={resources.threads_per_rank} --nproc-per-node {resources.nproc_per_node} "
        "--out-weights {output.weights} --out-metrics {output.metrics} > {log} 2>&1"


rule search:
    """PaS: DBC gates and weights trained on CE + MACs penalty towards the variant's target."""
    input:
        tracking=tracking_marker,
        weights=search_weights,
        latency_table=variant_latency_table,
    output:
        weights="results/seed{seed}/models/pas/{model}/search/weights.pt",
        masks="results/seed{seed}/models/pas/{model}/search/masks.json",
        history="results/seed{seed}/models/pas/{model}/search/history.json",
        metrics="results/seed{seed}/models/pas/{model}/search/metrics.json",
    log:
        "results/seed{seed}/models/pas/{model}/logs/search.log",
    benchmark:
        "results/seed{seed}/models/pas/{model}/logs/search.benchmark.tsv"
    params:
        stage=search_flags,
    threads: TRAIN_THREADS
    resources:
        **train_resources("search"),
    conda:
        PAS_ENV
    shell:
        "pas search {params.stage} --set threads={resources.threads_per_rank} --nproc-per-node {resources.nproc_per_node} --weights {input.weights} "
        "--out-weights {output.weights} --out-masks {output.masks} --out-history {output.history} "
        "--out-metrics {output.metrics} > {log} 2>&1"


rule finetune:
    """Gates frozen at the masks (PaS's, a baseline's, the full row's all-ones), CE only, the same budget
    for every method."""
    input:
        tracking=tracking_marker,
        weights=finetune_start,
        masks=model_masks,
    output:
        weights="results/seed{seed}/models/{method}/{model}/finetune/weights.pt",
        metrics="results/seed{seed}/models/{method}/{model}/finetune/metrics.json",
    log:
        "results/seed{seed}/models/{method}/{model}/logs/finetune.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/finetune.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(["pas", *BASELINE_METHODS, "full"]),
    params:
        stage=finetune_flags,
    threads: TRAIN_THREADS
    resources:
        **train_resources("finetune"),
    conda:
        PAS_ENV
    shell:
        "pas finetune {params.stage} --set threads={resources.threads_per_rank} --nproc-per-node {resources.nproc_per_node} "
        "--weights {input.weights} --masks {input.masks} --out-weights {output.weights} "
        "--out-metrics {output.metrics} > {log} 2>&1"


rule reparameterize:
    """Fuse every multi-branch block, cut the masked channels, export (`pas deploy`)."""
    input:
        tracking=tracking_marker,
        weights=deploy_weights,
        masks=model_masks,
    output:
        arch="results/seed{seed}/models/{method}/{model}/deploy/arch.json",
        weights="results/seed{seed}/models/{method}/{model}/deploy/model.safetensors",
        onnx="results/seed{seed}/models/{method}/{model}/deploy/model.onnx",
        record="results/seed{seed}/models/{method}/{model}/deploy/deploy.json",
    log:
        "results/seed{seed}/models/{method}/{model}/logs/reparameterize.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/reparameterize.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(["pas", *BASELINE_METHODS, *REFERENCE_METHODS]),
    params:
        stage=deploy_flags,
    threads: LIGHT_THREADS
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas deploy {params.stage} --set threads={threads} --weights {input.weights} --masks {input.masks} "
        "--out-dir $(dirname {output.arch}) > {log} 2>&1"


rule classifier:
    """Task translation: a classifier of the dataset's images (the silhouettes), trained once; its
    top-1 on a generator's translations is the translation's task metric."""
    input:
        tracking=tracking_marker,
    output:
        weights="results/classifier/{backbone}/weights.pt",
        metrics="results/classifier/{backbone}/metrics.json",
    log:
        "results/classifier/{backbone}/logs/pretrain.log",
    benchmark:
        "results/classifier/{backbone}/logs/pretrain.benchmark.tsv"
    wildcard_constraints:
        backbone=re.escape(config["translation"]["classifier"]["backbone"]),
    params:
        stage=classifier_flags,
    threads: TRAIN_THREADS
    resources:
        **train_resources("pretrain"),
    conda:
        PAS_ENV
    shell:
        "pas pretrain {params.stage} --set threads={resources.threads_per_rank} --nproc-per-node {resources.nproc_per_node} "
        "--out-weights {output.weights} --out-metrics {output.metrics} > {log} 2>&1"


rule scenes:
    """Task segmentation: the validation scenes as a COCO folder (annotations.json, images/), what every
    evaluation measures COCO AP on."""
    output:
        scenes=directory(SCENES),
    log:
        "results/data/logs/scenes.log",
    params:
        scenes=scenes_flags,
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas scenes {params.scenes} --out-dir {output.scenes} > {log} 2>&1"


rule evaluate:
    """Top-1/top-5, MACs (analytic and ptflops), params, latency and throughput of the plain network;
    a generator's L1, PSNR and the classifier's top-1 on its translations; a YOLACT's COCO AP on the
    scene folder; samples.png for both."""
    input:
        tracking=tracking_marker,
        classifier=classifier_weights,
        scenes=val_scenes,
        arch="results/seed{seed}/models/{method}/{model}/deploy/arch.json",
        weights="results/seed{seed}/models/{method}/{model}/deploy/model.safetensors",
    output:
        result="results/seed{seed}/models/{method}/{model}/eval.json",
        # tasks translation and segmentation: the first validation inputs, the outputs, the truth
        **({"samples": "results/seed{seed}/models/{method}/{model}/samples.png"}
           if config["task"] != "classification" else {}),
    log:
        "results/seed{seed}/models/{method}/{model}/logs/evaluate.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/evaluate.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(["pas", *BASELINE_METHODS, *REFERENCE_METHODS]),
    params:
        stage=evaluate_flags,
    threads: EVAL_THREADS
    resources:
        **EVAL_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas evaluate {params.stage} --set threads={threads} --arch {input.arch} --weights {input.weights} "
        "--out {output.result} > {log} 2>&1"


rule latency_table:
    """Per-layer latency of a backbone over a grid of widths, measured alone on the machine (`pas
    latency-table`): what a variant with a latency target ('3.5ms') searches and lands on."""
    output:
        table="results/latency_tables/{backbone}.json",
        csv="results/latency_tables/{backbone}.csv",
    log:
        "results/latency_tables/logs/{backbone}.log",
    benchmark:
        "results/latency_tables/logs/{backbone}.benchmark.tsv"
    params:
        table=latency_table_flags,
    threads: whole_machine
    resources:
        **LATENCY_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas latency-table {params.table} --out {output.table} --csv {output.csv} > {log} 2>&1"


rule latency:
    """Every deployed network of every seed timed side by side, alone on the machine, with PyTorch
    and ONNX Runtime at each batch size, alternating round by round (`pas latency`): the latencies of
    the table, comparable with each other."""
    input:
        latency_inputs,
    output:
        result=LATENCY_JSON,
    log:
        "results/latency/logs/latency.log",
    benchmark:
        "results/latency/logs/latency.benchmark.tsv"
    params:
        models=latency_flags,
    # every core of a local run, so that no other job runs while it measures; on SLURM a node of its
    # own (--exclusive) instead
    threads: whole_machine
    resources:
        **LATENCY_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas latency {params.models} --out {output.result} > {log} 2>&1"
