# Pruning-as-Search (Li et al., IJCAI 2022) as a workflow: pretrain -> search -> finetune ->
# reparameterize -> evaluate for every PaS variant, the baselines at the same targets, reference
# networks, then the results table, figures and report. All work is done by the `pas` command.
#
#   snakemake --cores all                                  # embedded default (animal-mnist, ~27 min on 2 cores)
#   snakemake --cores all --configfile config/evidence.yaml  # the same over 3 seeds: mean and spread
#   snakemake --cores all --configfile config/translation.yaml  # PaS on a CycleGAN generator
#   snakemake --cores all --configfile config/segmentation.yaml  # PaS on a YOLACT network
#   snakemake --configfile config/test.yaml --cores 2      # tiny, for CI
#   snakemake --profile profiles/slurm --configfile config/paper.yaml
#   snakemake --report results/report.html                 # after a run

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


SCHEMA = "workflow/schemas/config.schema.yaml"


include: "workflow/rules/checks.smk"


check_schema(config, workflow.basedir, SCHEMA)  # wrong types, unknown keys: one line naming the key
validate(config, SCHEMA)  # fills every default
check_config(config)  # backbones, MACs targets, duplicate names


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/reports.smk"


report: "workflow/report/workflow.rst"


localrules:
    all,
    tracking_init,
    tables,
    plots,
    evidence,
    tracking_ingest,
    samples,
    scenes,


onstart:
    check_data_paths(config)  # only for real runs: a dry run needs no data


rule all:
    input:
        rules.tables.output,
        # accuracy figures and the paper's claims: for the tasks with a top-1 (a classifier's)
        rules.plots.output if config["task"] != "segmentation" else [],
        rules.evidence.output if config["task"] != "segmentation" else [],
        rules.tracking_ingest.output if tracking_is_ingest() else [],
        rules.samples.output if config["task"] != "classification" else [],
    default_target: True
