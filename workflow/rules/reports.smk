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
    """Widths per layer, accuracy vs latency and MACs (Pareto front), gate convergence, search MACs."""
    input:
        table="results/tables/main.csv",
        histories=history_files,
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
    threads: 1
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas plots --table {input.table} {params.histories} --out-dir $(dirname {output.widths}) > {log} 2>&1"
