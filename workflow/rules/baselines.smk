# Baselines and reference rows. Each baseline prunes the SAME pretrained network to the SAME target as
# a PaS variant (uniform width, BN-gamma or L1 magnitude), then goes through the same finetune ->
# reparameterize -> evaluate rules (train.smk) with the same fine-tune budget. Reference rows: the full
# backbones with all-ones masks, fine-tuned like every pruned network, and smaller family members
# trained from scratch with the backbones' schedule (scratch) and for PaS's total epochs (scratch_long).


rule prune:
    """Baseline masks at a variant's target, from the pretrained backbone (`pas prune`)."""
    input:
        weights=search_weights,
        latency_table=variant_latency_table,
    output:
        masks="results/seed{seed}/models/{method}/{model}/masks.json",
    log:
        "results/seed{seed}/models/{method}/{model}/logs/prune.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/prune.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(BASELINE_METHODS),
    params:
        stage=prune_flags,
    threads: LIGHT_THREADS
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas prune {params.stage} --set threads={threads} --weights {input.weights} "
        "--out-masks {output.masks} > {log} 2>&1"


rule full_masks:
    """All-ones masks, so a reference network deploys through the same fuse + compact path."""
    input:
        data_check=data_check,
    output:
        masks="results/seed{seed}/models/{method}/{model}/masks.json",
    log:
        "results/seed{seed}/models/{method}/{model}/logs/full_masks.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/full_masks.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(REFERENCE_METHODS),
    params:
        stage=full_masks_flags,
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas prune {params.stage} --set threads={threads} --out-masks {output.masks} > {log} 2>&1"


rule train_scratch:
    """A smaller family member from scratch: the backbones' schedule (scratch) or PaS's total epochs
    (scratch_long)."""
    input:
        data_check=data_check,
        tracking=tracking_marker,
    output:
        weights="results/seed{seed}/models/{method}/{model}/train/weights.pt",
        metrics="results/seed{seed}/models/{method}/{model}/train/metrics.json",
    log:
        "results/seed{seed}/models/{method}/{model}/logs/train_scratch.log",
    benchmark:
        "results/seed{seed}/models/{method}/{model}/logs/train_scratch.benchmark.tsv"
    wildcard_constraints:
        method=alternatives(SCRATCH_METHODS),
    params:
        stage=scratch_flags,
    threads: TRAIN_THREADS
    resources:
        **train_resources("train_scratch"),
    conda:
        PAS_ENV
    shell:
        "pas pretrain {params.stage} --set threads={resources.threads_per_rank} --nproc-per-node {resources.nproc_per_node} "
        "--out-weights {output.weights} --out-metrics {output.metrics} > {log} 2>&1"
