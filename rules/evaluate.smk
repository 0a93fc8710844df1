rule evaluate_scene:
    """Step 5: metrics of one classified test scene against its reference roads, per road type."""
    input:
        image=scene_image,
        labels=scene_labels,
        classes="results/classified/{model}/{scene}/classes.tif",
        centrelines="results/classified/{model}/{scene}/centrelines.gpkg",
        direction="results/classified/{model}/{scene}/direction.tif",
    output:
        "results/evaluation/{model}/{scene}.json",
    params:
        row=scene_row,
        settings=eval_settings,
        image=config["image"],
    log:
        "logs/evaluation/{model}/{scene}.log",
    benchmark:
        "benchmarks/evaluation/{model}/{scene}.tsv"
    threads: 1
    resources:
        mem_mb=res("geo", "mem_mb", 4000),
        runtime=res("geo", "runtime", 60),
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/evaluate_scene.py"


rule aggregate_metrics:
    """Tables across test scenes: per scene, and summed per model and road type."""
    input:
        evaluation_results,
    output:
        scenes=report("results/evaluation/metrics_per_scene.csv", caption="../report/per_scene.rst", category="Metrics", labels={"table": "per scene"}),
        summary=report("results/evaluation/summary.csv", caption="../report/summary.rst", category="Metrics", labels={"table": "all test scenes"}),
        retention="results/evaluation/retention.csv",
    params:
        retention=scenes_with_role("retention"),
    log:
        "logs/evaluation/aggregate.log",
    benchmark:
        "benchmarks/evaluation/aggregate.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/aggregate_metrics.py"


rule report:
    """The before/after HTML report (self-contained: opens without a server)."""
    input:
        summary="results/evaluation/summary.csv",
        scenes="results/evaluation/metrics_per_scene.csv",
        retention="results/evaluation/retention.csv",
        models=classify_models,
        classified=expand(
            "results/classified/{model}/{scene}/classes.tif",
            model=CLASSIFY_MODELS,
            scene=scenes_with_role("test") + scenes_with_role("retention"),
        ),
    output:
        html="results/report/report.html",
        # The same results as files, for Snakemake's own report (snakemake --report report.zip).
        targets=report("results/report/targets.csv", caption="../report/targets.rst", category="Did the transfer work?", labels={"table": "checks"}),
        charts=report("results/report/bar_charts.png", caption="../report/figures.rst", category="Metrics", labels={"table": "bar charts"}),
        before_after=report(
            directory("results/report/before_after"),
            patterns=["{scene}.png"],
            caption="../report/before_after.rst",
            category="Before and after",
            labels={"scene": "{scene}"},
        ),
        training=report(
            directory("results/report/training"),
            patterns=["{model}.png"],
            caption="../report/training.rst",
            category="Training curves",
            labels={"model": "{model}"},
        ),
    params:
        config=config,
        scene_sheet=config["scenes"],
        test_scenes=lambda wc: {s: scenes.loc[s, "image"] for s in scenes_with_role("test")},
        retention_scenes=lambda wc: {s: scenes.loc[s, "image"] for s in scenes_with_role("retention")},
        models=CLASSIFY_MODELS,
        sample_sizes=sample_sizes,
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/report.py"
