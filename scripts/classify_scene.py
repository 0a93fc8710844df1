import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from roadxfer.classify import classify_scene, merge_shards  # noqa: E402
from roadxfer.glue import classify_settings, run_logged  # noqa: E402

sm = snakemake  # noqa: F821
settings = classify_settings(sm.params.settings, sm.params.image)
shards = list(sm.input.shards)
if shards:  # a sharded scene: join its shards (classes, probability pairs)
    main = lambda: merge_shards(sm.input.image, list(zip(shards[0::2], shards[1::2])), sm.input.model, sm.output.classes,  # noqa: E731
                                out_probability=sm.output.probability, out_centrelines=sm.output.centrelines, settings=settings)
else:
    main = lambda: classify_scene(sm.input.image, sm.input.model, sm.output.classes, out_probability=sm.output.probability,  # noqa: E731
                                  out_centrelines=sm.output.centrelines, settings=settings, threads=sm.threads)
run_logged(sm, main)
