rule vectorise_scene:
    """Step 4b: the road graph (centrelines.gpkg) of a classified scene, traced from its rasters; no model, no GPU.
    A sharded scene is traced once its shards are joined."""
    input:
        classes="results/classified/{model}/{scene}/classes.tif",
        attribute_table="results/classified/{model}/{scene}/classes.tif.aux.xml",
        probability="results/classified/{model}/{scene}/probability.tif",
        direction="results/classified/{model}/{scene}/direction.tif",
    output:
        "results/classified/{model}/{scene}/centrelines.gpkg",
    params:
        settings=config["vectorise"],
    log:
        "logs/vectorised/{model}/{scene}.log",
    benchmark:
        "benchmarks/vectorised/{model}/{scene}.tsv"
    threads: 1
    resources:
        mem_mb=res("geo", "mem_mb", 4000),
        runtime=res("geo", "runtime", 60),
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/vectorise_scene.py"
