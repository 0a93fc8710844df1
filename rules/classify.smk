rule classify_shard:
    """Step 4 of a big scene (classify.shard_size): one shard, exactly as the whole scene would classify it."""
    input:
        image=scene_image,
        model=classify_model,
    output:
        classes=temp("results/classified/{model}/{scene}/shards/{shard}/classes.tif"),
        probability=temp("results/classified/{model}/{scene}/shards/{shard}/probability.tif"),
        direction=temp("results/classified/{model}/{scene}/shards/{shard}/direction.tif"),
    params:
        settings=CLASSIFY_SETTINGS,
        image=config["image"],
        window=shard_window,
    log:
        "logs/classified/{model}/{scene}/shards/{shard}.log",
    benchmark:
        "benchmarks/classified/{model}/{scene}/shards/{shard}.tsv"
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
        "../scripts/classify_shard.py"


rule classify_scene:
    """Step 4: classify a whole scene with a model package (COG class, probability and direction rasters);
    a sharded scene's shards are joined here instead. The road graph is the next step (vectorise_scene)."""
    input:
        image=scene_image,
        model=classify_model,
        shards=classify_shards,
    output:
        classes="results/classified/{model}/{scene}/classes.tif",
        probability="results/classified/{model}/{scene}/probability.tif",
        # The road direction the model predicts (degrees clockwise from grid north); gaps are bridged along it.
        direction="results/classified/{model}/{scene}/direction.tif",
        # Raster attribute table and QGIS styles, which GIS software picks up by their names.
        attribute_table="results/classified/{model}/{scene}/classes.tif.aux.xml",
        classes_style="results/classified/{model}/{scene}/classes.qml",
        probability_style="results/classified/{model}/{scene}/probability.qml",
    params:
        settings=CLASSIFY_SETTINGS,
        image=config["image"],
    log:
        "logs/classified/{model}/{scene}.log",
    benchmark:
        "benchmarks/classified/{model}/{scene}.tsv"
    threads: res("classify", "threads", 4)
    resources:
        mem_mb=res("classify", "mem_mb", 16000),
        runtime=res("classify", "runtime", 240),
        gpu=classify_gpu,
    conda:
        "../envs/torch.yaml"
    container:
        container_for("torch")
    script:
        "../scripts/classify_scene.py"
