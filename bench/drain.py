"""The worker tier at saturation, measured fairly: studies are uploaded while no worker runs,
then one worker is started and its drain of the queue is timed from the database's own
timestamps, against model-only ONNX Runtime at the same batch size in the same run.

    .venv/bin/python bench/drain.py --model-dir models/current -n 160 --batch 4 \
        [--backends onnx onnx-int8] [--profile DIR]

Nothing else runs during a drain: the web server is idle (no uploads, no polling; the bench
reads the database file), so the worker has the machine to itself, as model-only does.
Rates skip each drain's first `--skip` studies (the worker's start and first batches).
Model-only runs the same forward pass as the worker (the classifier and, for an input gate with
a network of its own, that network) on batches of `--batch` real X-rays, with and without the
Grad-CAM output; it is measured before and after each drain and averaged, so that drift in
the machine's load falls on both. The worker's threads' CPU is read from /proc four times a
second, so each drain also says where its CPU went per study: the lanes (the model), Celery's
consumer thread and the task threads (everything else a study costs). With --profile, py-spy
samples the worker during the drains and the slowest functions (own time and with callees)
are printed and saved.
Appends to docs/benchmarks.md (--no-record: prints the tables instead, for paired runs).
"""

from __future__ import annotations

import argparse
import collections
import os
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import machine, record  # noqa: E402
from stack import BIN, BenchStack, real_xrays  # noqa: E402

from ml.backends import usable_cpus  # noqa: E402
from ml.imaging import decode_image  # noqa: E402
from ml.predictor import Predictor  # noqa: E402


def model_only(predictor: Predictor, batch: np.ndarray, explain: bool, seconds: float) -> float:
    """Images/s of the bare engine on one preprocessed batch, run by as many threads at once as
    the worker has lanes (each with the same share of the CPUs as a worker's lane)."""
    predictor.forward(batch, explain=explain)
    counts = [0] * predictor.lanes
    start = time.perf_counter()

    def lane(i: int) -> None:
        while time.perf_counter() - start < seconds:
            predictor.forward(batch, explain=explain)
            counts[i] += len(batch)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(predictor.lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _finished(db: Path) -> list[tuple[str, str | None, str | None]]:
    with sqlite3.connect(db, timeout=30) as con:
        return con.execute("SELECT status, started_at, finished_at FROM studies").fetchall()


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    spent = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
        spent[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return spent


def _cpu_at(snapshots: list[tuple[float, dict[int, float]]], when: float) -> dict[int, float]:
    """Each thread's CPU seconds at time `when`, interpolated between the snapshots around it."""
    later = next((i for i, (t, _) in enumerate(snapshots) if t >= when), len(snapshots) - 1)
    (t0, a), (t1, b) = snapshots[max(0, later - 1)], snapshots[later]
    w = 0.0 if t1 <= t0 else min(1.0, max(0.0, (when - t0) / (t1 - t0)))
    return {tid: a.get(tid, 0.0) + w * (cpu - a.get(tid, 0.0)) for tid, cpu in b.items()}


def cpu_per_study(snapshots: list[tuple[float, dict[int, float]]], start: float, end: float,
                  studies: int, lanes: int, main_tid: int) -> dict[str, float]:
    """The worker's CPU ms per study between two times, split into the lanes (the `lanes`
    busiest threads: the model), Celery's consumer (the main thread) and the rest (the task
    threads, heartbeats), and the CPUs' share it kept busy."""
    first, last = _cpu_at(snapshots, start), _cpu_at(snapshots, end)
    used = {tid: last[tid] - first.get(tid, 0.0) for tid in last}
    lane_ids = sorted((t for t in used if t != main_tid), key=used.get, reverse=True)[:lanes]
    lane_cpu = sum(used[t] for t in lane_ids)
    consumer = used.get(main_tid, 0.0)
    rest = sum(used.values()) - lane_cpu - consumer
    return {"lanes": lane_cpu / studies * 1000, "consumer": consumer / studies * 1000,
            "tasks": rest / studies * 1000,
            "busy": sum(used.values()) / ((end - start) * usable_cpus())}


def drain(
    model_dir: Path,
    files: list[Path],
    backend: str,
    gradcam: bool,
    batch: int,
    lanes: int,
    concurrency: int,
    skip: int,
    profile: Path | None,
) -> dict[str, float]:
    """Upload every file with no worker running, start one, time the drain."""
    stack = BenchStack(
        model_dir,
        env={
            "INFERENCE_BACKEND": backend,
            "GRADCAM": "1" if gradcam else "0",
            "BATCH_MAX_SIZE": str(batch),
            "INFERENCE_LANES": str(lanes),
        },
    )
    spy = None
    try:
        for path in files:
            stack.upload(path)
        db = stack.tmp / "bench.db"
        # More task threads than the lanes' batches hold: decoding overlaps inference.
        stack.start_workers(1, concurrency=concurrency or 2 * batch * lanes)
        worker = stack.workers[0]
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            raw = profile / f"{backend}-{'cam' if gradcam else 'nocam'}-b{batch}.txt"
            spy = subprocess.Popen(
                [
                    str(BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(worker.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "50",
                    "--threads",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60 + 5 * len(files)
        snapshots: list[tuple[float, dict[int, float]]] = []
        while time.monotonic() < deadline:
            snapshots.append((time.time(), _thread_cpu(worker.pid)))
            if len(snapshots) % 4 == 0:  # the database once a second
                rows = _finished(db)
                if all(r[0] in ("succeeded", "failed") for r in rows):
                    break
            time.sleep(0.25)
        else:
            raise TimeoutError("the drain did not finish")
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
            spy.wait(timeout=60)
    finally:
        stack.stop()
    failed = sum(r[0] != "succeeded" for r in rows)
    if failed:
        raise RuntimeError(f"{failed} studies failed: see {stack.tmp / 'stack.log'}")
    done = sorted(_utc(r[2]) for r in rows)
    span = (done[-1] - done[skip - 1]).total_seconds()
    cpu = cpu_per_study(snapshots, done[skip - 1].timestamp(), done[-1].timestamp(),
                        len(done) - skip, lanes, worker.pid)
    return {"rate": (len(done) - skip) / span, "studies": len(done), **cpu}


def _utc(stamp: str) -> datetime:
    when = datetime.fromisoformat(stamp)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


PROJECT = ("ml/", "worker/", "webapp/")


def hot_functions(raw: Path, top: int = 12) -> list[str]:
    """From py-spy's collapsed stacks of the task and batcher threads: each sample charged to the
    deepest project function on its stack (its callees in libraries included), as shares."""
    charged: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if (
            "_loop (worker/batching.py" not in stack
            and "process_study (worker/tasks.py" not in stack
        ):
            continue  # the consumer loop, heartbeats, the process's start
        frames = [f for f in stack.split(";")[1:] if f.rsplit("(", 1)[-1].startswith(PROJECT)]
        name = "(Celery and Kombu, outside the project's code)"
        if frames:
            func, _, where = frames[-1].rpartition(" (")
            name = f"{where.split(':')[0]}:{func}"
        charged[name] += int(count)
        total += int(count)
    if not total:
        return ["(no samples)"]
    rows = ["| deepest project function (with what it calls) | share of samples |", "|---|---|"]
    rows += [f"| `{name}` | {n / total:.1%} |" for name, n in charged.most_common(top)]
    return rows


def main() -> None:
    """Drain with and without heatmaps per backend, model-only beside each; record them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path("models/current"))
    parser.add_argument("-n", type=int, default=160, help="studies per drain (one image each)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--skip", type=int, default=16, help="studies left out at each drain's start"
    )
    parser.add_argument("--backends", nargs="+", default=["onnx"])
    parser.add_argument("--concurrency", type=int, default=0,
                        help="the worker's threads (0: two batches per lane)")
    parser.add_argument("--heatmaps", choices=("on", "off", "both"), default="both")
    parser.add_argument("--lanes", type=int, default=0, help="INFERENCE_LANES (0: one per CPU)")
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="model-only time per measurement"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy the worker; collapsed stacks into this folder"
    )
    parser.add_argument("--no-record", action="store_true",
                        help="print the tables instead of appending them to docs/benchmarks.md")
    args = parser.parse_args()
    model_dir = args.model_dir.resolve()
    files = real_xrays(args.n)
    pixels = [decode_image(p.read_bytes()).pixels for p in files[: args.batch]]
    results = []
    for backend in args.backends:
        predictor = Predictor.load(model_dir, backend=backend, lanes=args.lanes or usable_cpus())
        batch = predictor.preprocess(pixels)
        for gradcam in {"on": (True,), "off": (False,), "both": (True, False)}[args.heatmaps]:
            before = model_only(predictor, batch, gradcam, args.seconds)
            d = drain(model_dir, files, backend, gradcam, args.batch, predictor.lanes,
                      args.concurrency, args.skip, args.profile)
            after = model_only(predictor, batch, gradcam, args.seconds)
            bare = (before + after) / 2
            results.append((backend, gradcam, bare, before, after, d, predictor.lanes))
            print(
                f"{backend} gradcam={gradcam}: drain {d['rate']:.2f}/s model-only {bare:.2f}/s "
                f"({before:.2f}, {after:.2f}) ratio {d['rate'] / bare:.3f}; worker CPU ms per "
                f"study: lanes {d['lanes']:.1f}, consumer {d['consumer']:.1f}, tasks "
                f"{d['tasks']:.1f}; CPUs busy {d['busy']:.0%}",
                flush=True,
            )
    lines = [
        f"\n### {datetime.now(UTC):%Y-%m-%d} drain, model `{model_dir.name}`, batch {args.batch}, "
        f"{args.n} studies, one worker ({results[0][6]} lanes, threads x"
        f"{args.concurrency or 2 * args.batch * results[0][6]}), "
        "SQLite\n",
        f"`python {' '.join(sys.argv)}`\n",
        f"{machine()}; load average after: {os.getloadavg()[0]:.1f}\n",
        "| backend | heatmaps | model-only images/s (before, after) | drain studies/s "
        "| drain / model-only | worker CPU ms per study in the drain: lanes / Celery's "
        "consumer / task threads | CPUs busy |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {b} | {'on' if g else 'off'} | {bare:.2f} ({x:.2f}, {y:.2f}) | {d['rate']:.2f} "
            f"| {d['rate'] / bare:.2f} | {d['lanes']:.1f} / {d['consumer']:.1f} / "
            f"{d['tasks']:.1f} | {d['busy']:.0%} |"
            for b, g, bare, x, y, d, _ in results
        ],
    ]
    if args.profile:
        for raw in sorted(args.profile.glob("*.txt")):
            lines += [
                f"\nWorker profile, {raw.stem} (py-spy, task and batcher threads' samples):\n",
                *hot_functions(raw),
            ]
    text = "\n".join(lines) + "\n"
    record(text, append=not args.no_record)


if __name__ == "__main__":
    main()
