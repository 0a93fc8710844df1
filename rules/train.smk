rule train_model:
    """Step 3: train one model (from scratch, or from a pretrained package with the encoder frozen)."""
    input:
        unpack(model_inputs),
    output:
        directory("results/models/{model}"),
    params:
        training=model_training,
        classes=config["classes"],
        workdir="results/checkpoints/{model}",
    log:
        "logs/models/{model}.log",
    benchmark:
        "benchmarks/models/{model}.tsv"
    threads: res("train", "threads", 8)
    resources:
        mem_mb=res("train", "mem_mb", 32000),
        runtime=res("train", "runtime", 720),
        gpu=res("train", "gpu", 1),
    conda:
        "../envs/torch.yaml"
    container:
        container_for("torch")
    script:
        "../scripts/train_model.py"
