# The results table and figures, both marked for `snakemake --report results/report.html`.

PLOTS = ("widths", "accuracy_latency", "accuracy_macs", "gates", "search_macs")


rule tables:
    """One row per network: MACs (target, achieved), params, top-1/5, latency, wall times."""
    input:
        table_files,
    output:
        csv=report("results/tables/main.csv", caption="../report/table.rst", category="Results table"),
        md="results/tables/main.md",
        tex="results/tables/main.tex",
    log:
        "results/tables/logs/tables.log",
    benchmark:
        "results/tables/logs/tables.benchmark.tsv"
    params:
        rows=table_flags,
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas tables {params.rows} --out-dir $(dirname {output.csv}) > {log} 2>&1"


rule plots:
    """Widths per layer (against the full backbone and the scratch member at the same MACs), accuracy vs
    PyTorch latency and MACs over every seed, gate convergence, search MACs."""
    input:
        table="results/tables/main.csv",
        histories=plot_inputs,
    output:
        **{name: report(f"results/plots/{name}.png", caption=f"../report/{name}.rst", category="Figures")
           for name in PLOTS},
        **{f"{name}_pdf": f"results/plots/{name}.pdf" for name in PLOTS},
    log:
        "results/plots/logs/plots.log",
    benchmark:
        "results/plots/logs/plots.benchmark.tsv"
    params:
        histories=history_flags,
        seed=lambda wildcards: seeds()[0],
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas plots --table {input.table} --seed {params.seed} {params.histories} "
        "--out-dir $(dirname {output.widths}) > {log} 2>&1"


rule samples:
    """Tasks translation and segmentation: the first seed's samples of every row (translations; predicted
    masks), with the inputs and the truth."""
    input:
        samples_inputs,
    output:
        png=report("results/plots/samples.png", caption="../report/samples.rst", category="Figures"),
    log:
        "results/plots/logs/samples.log",
    params:
        models=samples_flags,
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas samples {params.models} --out {output.png} > {log} 2>&1"


rule evidence:
    """The paper's claims over every seed: top-1 mean and spread per method and target, PaS against
    each baseline paired by seed (95% interval, ahead / behind / within noise), when the gates settle,
    the keep-fraction per resolution, each claim's verdict (`pas evidence`)."""
    input:
        table="results/tables/main.csv",
        runs=evidence_files,
    output:
        csv=report("results/evidence/accuracy.csv", caption="../report/evidence.rst", category="Evidence"),
        md="results/evidence/accuracy.md",
        tex="results/evidence/accuracy.tex",
        png=report("results/evidence/accuracy.png", caption="../report/evidence_plot.rst", category="Evidence"),
        pdf="results/evidence/accuracy.pdf",
        comparisons=report("results/evidence/comparisons.csv", caption="../report/comparisons.rst",
                           category="Evidence"),
        comparisons_md="results/evidence/comparisons.md",
        convergence="results/evidence/convergence.csv",
        profile="results/evidence/width_profile.csv",
        claims=report("results/evidence/claims.md", caption="../report/claims.rst", category="Evidence"),
        verdicts="results/evidence/verdicts.json",
    log:
        "results/evidence/logs/evidence.log",
    benchmark:
        "results/evidence/logs/evidence.benchmark.tsv"
    params:
        runs=evidence_flags,
        epochs=lookup(dpath="search/epochs", within=config),
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas evidence --table {input.table} {params.runs} --search-epochs {params.epochs} "
        "--out-dir $(dirname {output.csv}) > {log} 2>&1"


rule tracking_ingest:
    """tracking.mode ingest: replay every job's run record into the MLflow store, on the submitting
    machine, once everything is done; run again (--forcerun) to rebuild a deleted store."""
    input:
        rules.tables.output,
        rules.evidence.output if config["task"] != "segmentation" else [],
    output:
        marker="results/mlflow/ingested.txt",
    log:
        "results/mlflow/logs/tracking_ingest.log",
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
        "pas tracking-ingest results --uri {params.uri:q} --experiment {params.experiment:q} "
        "--artifact-root {params.artifact_root:q} > {output.marker} 2> {log}"
