rule evaluate_scene:
    """Step 5: metrics of one classified test scene against its reference roads, per road type."""
    input:
        image=scene_image,
        labels=scene_labels,
        classes="results/classified/{model}/{scene}/classes.tif",
        centrelines="results/classified/{model}/{scene}/centrelines.gpkg",
    output:
        "results/evaluation/{model}/{scene}.json",
    params:
        row=scene_row,
        settings=eval_settings,
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
        scenes="results/evaluation/metrics_per_scene.csv",
        summary="results/evaluation/summary.csv",
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
        models=expand("results/models/{model}", model=CLASSIFY_MODELS),
        classified=expand(
            "results/classified/{model}/{scene}/classes.tif",
            model=CLASSIFY_MODELS,
            scene=scenes_with_role("test"),
        ),
    output:
        "results/report/report.html",
    params:
        config=config,
        scene_sheet=config["scenes"],
        test_scenes=lambda wc: {s: scenes.loc[s, "image"] for s in scenes_with_role("test")},
        models=CLASSIFY_MODELS,
    log:
        "logs/report/report.log",
    benchmark:
        "benchmarks/report/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/torch.yaml"
    container:
        container_for("torch")
    script:
        "../scripts/report.py"
