"""Worker memory over thousands of studies: RSS of one worker process (threads pool) sampled
as studies complete.

    .venv/bin/python bench/soak.py --model-dir models/dev -n 2000

Appends to docs/benchmarks.md: RSS after warm-up (the first 10% of studies), at the end, and
the change between them.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record  # noqa: E402
from stack import BenchStack, real_xrays  # noqa: E402


def rss_mb(proc: psutil.Process) -> float:
    """Resident memory of the worker and its children, MiB."""
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20


def main() -> None:
    """Run the soak and record it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/dev")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--backend", default="onnx")
    args = parser.parse_args()
    files = real_xrays(200)
    stack = BenchStack(args.model_dir, env={"INFERENCE_BACKEND": args.backend})
    samples: list[tuple[int, float]] = []
    try:
        stack.start_workers(1)
        worker = psutil.Process(stack.workers[0].pid)
        done = 0
        start = time.perf_counter()
        chunk = 100
        while done < args.n:
            with ThreadPoolExecutor(4) as pool:
                ids = list(pool.map(stack.upload, [files[(done + i) % len(files)]
                                                   for i in range(chunk)]))
            for study_id in ids:
                stack.wait(study_id, poll=0.05)
            done += chunk
            samples.append((done, rss_mb(worker)))
            print(f"studies={done} rss_mb={samples[-1][1]:.0f}", flush=True)
        elapsed = time.perf_counter() - start
    finally:
        stack.stop()
    warm = next(rss for n, rss in samples if n >= args.n // 10)
    end = samples[-1][1]
    peak = max(rss for _, rss in samples)
    line = (f"\n### {datetime.now(UTC):%Y-%m-%d} soak, {args.n} studies, 1 worker ({args.backend}), "
            f"{elapsed:.0f} s\n\n`python {' '.join(sys.argv)}`\n\n"
            f"| RSS after warm-up ({args.n // 10} studies) | RSS at the end | change | peak |\n|---|---|---|---|\n"
            f"| {warm:.0f} MiB | {end:.0f} MiB | {(end - warm) / warm:+.1%} | {peak:.0f} MiB |\n"
            f"\nSamples (studies, MiB): {', '.join(f'{n}:{r:.0f}' for n, r in samples)}\n")
    record(line)


if __name__ == "__main__":
    main()
