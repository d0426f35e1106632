"""Upload-to-result latency for real X-rays at light load, through the real stack.

Embedded Redis, a fresh SQLite database, one Celery worker, gunicorn; N real
X-rays uploaded one at a time over HTTP, each waited for. Prints the first
study right after start (model load included), warm p50/p95, and the model's
own forward-pass time reported on each prediction; appends to docs/benchmarks.md.

    .venv/bin/python bench/e2e_latency.py --model-dir models/dev -n 20 [--backend keras]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import ROOT, BenchStack, percentile, real_xrays  # noqa: E402


def main() -> None:
    """Run the benchmark and print/record its figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/dev")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--backend", default="keras")
    args = parser.parse_args()
    stack = BenchStack(args.model_dir, env={"INFERENCE_BACKEND": args.backend})
    try:
        stack.start_workers(1)
        time.sleep(3)  # Celery's own start; "first" then measures the model load
        latencies, forward = [], []
        for path in real_xrays(args.n):
            t0 = time.perf_counter()
            body = stack.wait(stack.upload(path))
            latencies.append(time.perf_counter() - t0)
            forward.append(body["images"][0]["result"]["inference_ms"] / 1000)
    finally:
        stack.stop()
    warm = latencies[1:]
    line = (f"| {datetime.now(UTC):%Y-%m-%d} | e2e_latency, {args.n} real X-rays one at a time, "
            f"1 worker ({args.backend}), SQLite, model `{Path(args.model_dir).name}` | first study "
            f"right after start {latencies[0]:.2f} s | warm upload-to-result p50 "
            f"{statistics.median(warm):.3f} s, p95 {percentile(warm, 95):.3f} s | forward pass p50 "
            f"{statistics.median(forward[1:]):.3f} s |")
    print(line)
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write(f"\n`python {' '.join(sys.argv)}`\n\n{line}\n")


if __name__ == "__main__":
    main()
