"""SLURM overhead on the test cluster, and the wall time it implies for a large area. Prints figures; asserts nothing.

  sudo python bench/bench_slurm.py [--jobs 20] [--mp-per-s 0.29 100] [--shard 8192]

Starts the single-node test cluster of tests/slurm (root, slurm-wlm and munge needed),
submits ``--jobs`` trivial batch jobs one after another, and reads SubmitTime, StartTime
and EndTime of each from ``scontrol`` (1 s resolution): submission to start is the
scheduler's latency, start to end the job's launch and teardown around a no-op. The
snakemake executor adds its status polling (the profile's seconds-between-status-checks)
on top, so a finished job is noticed up to that much later.

Then the projection: shards of ``--shard`` px covering 10,000 km² at 0.3 m, each
classified at each ``--mp-per-s`` rate (0.29 MP/s is the 2-core CPU figure measured by
bench/bench_shards.py; a GPU rate is an assumption until measured on one), plus the
measured SLURM overhead and a model load, on 1, 8 and 64 GPUs running shards in parallel.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slurm.cluster import Cluster, why_unavailable  # noqa: E402


def _times(details: str) -> dict[str, dt.datetime]:
    out = {}
    for key in ("SubmitTime", "StartTime", "EndTime"):
        value = details.split(f"{key}=", 1)[1].split()[0]
        out[key] = dt.datetime.fromisoformat(value)
    return out


def measure(jobs: int) -> list[dict[str, float]]:
    reason = why_unavailable()
    if reason:
        sys.exit(f"no SLURM cluster: {reason}")
    with tempfile.TemporaryDirectory(prefix="roadxfer-slurm-bench-") as tmp:
        c = Cluster(Path(tmp))
        c.start()
        try:
            ids = []
            for _ in range(jobs):  # one at a time on an idle cluster: the latency a lone shard job meets
                out = subprocess.run(["sbatch", "--parsable", "-p", "cpu", "--mem", "100", "-t", "1", "-o", f"{tmp}/%j.out", "--wrap", "true"],
                                     env=c.env, capture_output=True, text=True, check=True)
                ids.append(out.stdout.strip().split(";")[0])
                deadline = time.time() + 120
                while time.time() < deadline and any(j["state"] not in ("COMPLETED", "FAILED", "CANCELLED") for j in c.jobs() if j["id"] == ids[-1]):
                    time.sleep(0.2)
            rows = []
            for i in ids:
                t = _times(c.job_details(i))
                rows.append({"queue_s": (t["StartTime"] - t["SubmitTime"]).total_seconds(), "run_s": (t["EndTime"] - t["StartTime"]).total_seconds()})
            return rows
        finally:
            c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--mp-per-s", type=float, nargs="+", default=[0.29, 30.0, 100.0])
    ap.add_argument("--shard", type=int, default=8192)
    ap.add_argument("--model-load-s", type=float, default=5.0, help="per shard job: start Python, import torch, load the package (measured about 4-6 s on this CPU)")
    ap.add_argument("--poll-s", type=float, default=10.0, help="the executor's status polling interval (profiles/slurm: seconds-between-status-checks)")
    args = ap.parse_args()
    rows = measure(args.jobs)
    queue = [r["queue_s"] for r in rows]
    run = [r["run_s"] for r in rows]
    print(f"{len(rows)} no-op jobs: submission to start mean {statistics.mean(queue):.2f} s (max {max(queue):.0f} s); "
          f"start to end mean {statistics.mean(run):.2f} s (max {max(run):.0f} s); 1 s resolution")
    overhead = statistics.mean(queue) + statistics.mean(run) + args.poll_s / 2 + args.model_load_s
    area_px = 10_000 * 1e6 / 0.3**2
    shards = math.ceil(area_px / args.shard**2)
    print(f"\n10,000 km² at 0.3 m = {area_px / 1e6:,.0f} MP = {shards:,} shards of {args.shard} px "
          f"(overhead per shard {overhead:.1f} s: queue + launch measured, half the polling interval and a model load assumed)")
    print("| classification rate (MP/s per GPU) | per shard (s) | 1 GPU | 8 GPUs | 64 GPUs |")
    print("|---|---|---|---|---|")
    for rate in args.mp_per_s:
        per = args.shard**2 / 1e6 / rate + overhead
        cells = []
        for g in (1, 8, 64):
            hours = math.ceil(shards / g) * per / 3600
            cells.append(f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} d")
        print(f"| {rate:g} | {per:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
