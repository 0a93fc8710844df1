rule rasterize_labels:
    """Step 1: buffered polylines -> label and orientation rasters on the image grid."""
    input:
        image=scene_image,
        labels=scene_labels,
    output:
        label="results/labels/{scene}/label.tif",
        orientation="results/labels/{scene}/orientation.tif",
        summary="results/labels/{scene}/summary.json",
    params:
        row=scene_row,
        labels=config["labels"],
        image=config["image"],
        classes=config["classes"],
    log:
        "logs/labels/{scene}.log",
    benchmark:
        "benchmarks/labels/{scene}.tsv"
    threads: 1
    resources:
        mem_mb=res("geo", "mem_mb", 4000),
        runtime=res("geo", "runtime", 60),
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/rasterize_labels.py"
