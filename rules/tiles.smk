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


rule gather_tiles:
    """Merge the tile datasets of one role into one training manifest."""
    input:
        role_tiles,
    output:
        "results/datasets/{role}.json",
    log:
        "logs/datasets/{role}.log",
    benchmark:
        "benchmarks/datasets/{role}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/gather_tiles.py"
