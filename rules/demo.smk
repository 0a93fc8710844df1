rule demo_scene:
    """Generate one synthetic demo scene (image + road centrelines)."""
    output:
        image=f"{DEMO_DIR}/{{demo}}.tif",
        labels=f"{DEMO_DIR}/{{demo}}.gpkg",
    params:
        seed=lambda wc: config["demo"]["scenes"][wc.demo]["seed"],
        kind=lambda wc: config["demo"]["scenes"][wc.demo].get("kind", "mixed"),
        size=lambda wc: config["demo"]["scenes"][wc.demo].get("size", config["demo"]["size"]),
        # landscape, cell size and lanes only where the scene sets them (roadxfer.demo has the defaults)
        look=lambda wc: {k: v for k, v in config["demo"]["scenes"][wc.demo].items() if k in ("landscape", "cell", "lanes")},
    wildcard_constraints:
        demo="|".join(config["demo"]["scenes"]) or "NO_DEMO",
    log:
        "logs/demo_scene/{demo}.log",
    benchmark:
        "benchmarks/demo_scene/{demo}.tsv"
    threads: 1
    resources:
        mem_mb=res("geo", "mem_mb", 4000),
        runtime=res("geo", "runtime", 60),
    conda:
        "../envs/geo.yaml"
    container:
        container_for("geo")
    script:
        "../scripts/demo_scene.py"
