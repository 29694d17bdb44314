# The data check: every image of an ImageFolder dataset (imagenet, folder) opened and decoded once,
# before any training job, so one unreadable file does not stop a training job hours in. Every rule
# that loads the data waits for its report (pretrain, train_scratch, full_masks; search, prune,
# finetune, reparameterize and evaluate through their inputs). dataset.bad_images: `stop` fails this
# job naming the bad files (its log lists them all); `skip` lets it pass and the stages drop the files
# the report lists. The embedded and CIFAR datasets have nothing to check: no job asks for the report.


rule check_data:
    """List every unreadable image of the dataset (`pas check-data`): results/data/check.json."""
    output:
        report=DATA_CHECK,
    log:
        f"{RESULTS}/data/logs/check_data.log",
    benchmark:
        f"{RESULTS}/data/logs/check_data.benchmark.tsv"
    params:
        stage=check_data_flags,
    threads: LIGHT_THREADS
    resources:
        **LIGHT_RESOURCES,
    conda:
        PAS_ENV
    shell:
        "pas check-data {params.stage} --workers {threads} --out {output.report} > {log} 2>&1"
