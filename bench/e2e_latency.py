"""Upload-to-result latency for real X-rays at light load, through the real stack.

Starts embedded Redis, migrates a fresh SQLite database, one Celery worker and
gunicorn, then uploads N real X-rays one at a time over HTTP and waits for each
result. Prints the cold first study (model load included), warm p50/p95, and the
model's own inference time reported on each prediction, and appends a row to
docs/benchmarks.md.

    .venv/bin/python bench/e2e_latency.py --model-dir models/dev -n 20
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.run_local import free_port, start_embedded_redis, wait_for_port  # noqa: E402

BIN = Path(sys.executable).parent
CXR = ROOT.parent / "shared" / "data" / "cxr"


def main() -> None:
    """Run the benchmark and print/record its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/dev")
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    with open(CXR / "manifest.csv", newline="") as f:
        files = [CXR / r["file"] for r in csv.DictReader(f)][:: 3542 // args.n][: args.n]
    tmp = Path(tempfile.mkdtemp())
    redis_proc, redis_url = start_embedded_redis()
    env = dict(os.environ, DATABASE_URL=f"sqlite:///{tmp / 'bench.db'}", REDIS_URL=redis_url,
               MODEL_DIR=str(Path(args.model_dir).resolve()), SECRET_KEY="bench",
               CELERY_QUEUE=f"bench-{uuid.uuid4().hex[:6]}", TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([str(BIN / "flask"), "--app", "webapp:create_app", "db", "upgrade"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    log = open(tmp / "stack.log", "wb")
    procs = [
        subprocess.Popen([str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--concurrency=1",
                          f"--queues={env['CELERY_QUEUE']}", "--without-gossip", "--without-mingle"],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
        subprocess.Popen([str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
                          "webapp:create_app()"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
    ]
    try:
        assert wait_for_port(port, 60)
        time.sleep(3)  # let the worker finish booting so "cold" measures the model load, not Celery's start
        base = f"http://127.0.0.1:{port}"
        latencies, inference = [], []
        for path in files:
            t0 = time.perf_counter()
            r = requests.post(f"{base}/api/v1/studies", files={"files": (path.name, path.read_bytes())})
            r.raise_for_status()
            url = base + r.headers["Location"]
            while not (body := requests.get(url).json())["done"]:
                time.sleep(0.02)
            latencies.append(time.perf_counter() - t0)
            assert body["status"] == "succeeded", body
            inference.append(body["images"][0]["result"]["inference_ms"] / 1000)
        cold, warm = latencies[0], latencies[1:]
        warm_p50 = statistics.median(warm)
        warm_p95 = statistics.quantiles(warm, n=20)[-1] if len(warm) >= 2 else warm_p50
        infer_p50 = statistics.median(inference[1:])
        line = (f"| {datetime.now(UTC):%Y-%m-%d} | e2e_latency, {args.n} real X-rays one at a time, "
                f"1 CPU worker, SQLite, model `{Path(args.model_dir).name}` | first study right after start "
                f"{cold:.2f} s | warm upload-to-result p50 {warm_p50:.3f} s, p95 {warm_p95:.3f} s | "
                f"forward pass p50 {infer_p50:.3f} s | rest (decode, Grad-CAM, DB, queue, polling) "
                f"p50 {warm_p50 - infer_p50:.3f} s |")
        print(line)
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}`\n\n{line}\n")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        redis_proc.terminate()


if __name__ == "__main__":
    main()
