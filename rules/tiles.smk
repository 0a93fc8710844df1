rule export_tiles:
    """Step 2: cut a scene into classified tiles (Esri Classified Tiles layout)."""
    input:
        image=scene_image,
        label="results/labels/{scene}/label.tif",
        orientation="results/labels/{scene}/orientation.tif",
    output:
        directory("results/tiles/{scene}"),
    params:
        tiles=role_tile_settings,
        image=config["image"],
        classes=config["classes"],
        bin_size=config["labels"]["orientation_bin_size"],
    log:
        "logs/tiles/{scene}.log",
    benchmark:
        "benchmarks/tiles/{scene}.tsv"
    threads: 1
    resources:
        mem_mb=res("geo", "mem_mb", 4000),
        runtime=res("geo", "runtime", 60),
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/export_tiles.py"
