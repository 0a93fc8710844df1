import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.classify import classify_scene, merge_shards  # noqa: E402
from roadxfer.glue import run_logged  # noqa: E402
from roadxfer.settings import classify_settings  # noqa: E402

sm = snakemake  # noqa: F821
settings = classify_settings(sm.params.settings, sm.params.image)
shards = list(sm.input.shards)
outputs = {"out_probability": sm.output.probability, "out_direction": sm.output.direction}
if shards:  # a sharded scene: join its shards (classes, probability, direction per shard)
    main = lambda: merge_shards(sm.input.image, list(zip(shards[0::3], shards[1::3], shards[2::3])), sm.input.model,  # noqa: E731
                                sm.output.classes, **outputs, settings=settings, threads=sm.threads)
else:
    main = lambda: classify_scene(sm.input.image, sm.input.model, sm.output.classes, **outputs, settings=settings, threads=sm.threads)  # noqa: E731
run_logged(sm, main)
