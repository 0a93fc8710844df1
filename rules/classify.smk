rule classify_scene:
    """Step 4: classify a whole scene with a model package (COG class raster, probability, centrelines)."""
    input:
        image=scene_image,
        model="results/models/{model}",
    output:
        classes="results/classified/{model}/{scene}/classes.tif",
        probability="results/classified/{model}/{scene}/probability.tif",
        centrelines="results/classified/{model}/{scene}/centrelines.gpkg",
    params:
        settings=config["classify"],
    log:
        "logs/classified/{model}/{scene}.log",
    benchmark:
        "benchmarks/classified/{model}/{scene}.tsv"
    threads: res("classify", "threads", 4)
    resources:
        mem_mb=res("classify", "mem_mb", 16000),
        runtime=res("classify", "runtime", 240),
        gpu=res("classify", "gpu", 1),
    conda:
        "../envs/torch.yaml"
    container:
        container_for("torch")
    script:
        "../scripts/classify_scene.py"
