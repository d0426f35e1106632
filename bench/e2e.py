"""End to end through the HTTP API on real X-rays: cold start, light load, saturation with 1 and
2 workers, against model-only ONNX Runtime throughput measured in the same run.

    .venv/bin/python bench/e2e.py --model-dir models/dev [-n 200]

Needs an ONNX export in the model dir (python -m ml.export). Appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record  # noqa: E402
from stack import BenchStack, percentile, real_xrays, timings  # noqa: E402

from ml.imaging import decode_image  # noqa: E402
from ml.overlay import normalise_maps, overlay_png  # noqa: E402
from ml.predictor import Predictor  # noqa: E402


def model_only(model_dir: Path, files: list[Path], seconds: float = 6.0) -> dict[str, float]:
    """Bare ONNX Runtime images/s per batch size, and one image's decode+preprocess+model+overlay time."""
    predictor = Predictor.load(model_dir, backend="onnx")
    pixels = [decode_image(p.read_bytes()).pixels for p in files[:16]]
    out: dict[str, float] = {}
    for bs in (1, 4, 8, 16):
        batch = predictor.preprocess(pixels[:bs])
        predictor.backend.run(batch, explain=False)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            predictor.backend.run(batch, explain=False)
            n += bs
        out[f"ort_bs{bs}"] = n / (time.perf_counter() - start)
    singles = []
    for p in files[:20]:
        t = time.perf_counter()
        image = decode_image(p.read_bytes()).pixels
        _, cam = predictor.backend.run(predictor.preprocess([image]), explain=True)
        overlay_png(image, normalise_maps(cam)[0])
        singles.append(time.perf_counter() - t)
    out["single_image_pipeline_s"] = statistics.median(singles)
    return out


def saturate(stack: BenchStack, files: list[Path]) -> dict[str, float]:
    """Upload every file at once (4 client threads), wait for all; throughput from server timestamps."""
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(stack.upload, files))
    bodies = [stack.wait(i, timeout=1800, poll=0.2) for i in ids]
    created = [datetime.fromisoformat(b["created_at"]) for b in bodies]
    finished = [datetime.fromisoformat(b["finished_at"]) for b in bodies]
    span = (max(finished) - min(created)).total_seconds()
    t = [timings(b) for b in bodies]
    e2e = [x["end_to_end"] for x in t]
    wait = [x["queue_wait"] for x in t]
    return {"throughput": len(ids) / span, "p50": percentile(e2e, 50), "p95": percentile(e2e, 95),
            "p99": percentile(e2e, 99), "wait_p50": percentile(wait, 50)}


def main() -> None:
    """Run the scenarios and record them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/dev")
    parser.add_argument("-n", type=int, default=200, help="studies per saturation run")
    args = parser.parse_args()
    model_dir = Path(args.model_dir).resolve()
    files = real_xrays(args.n)
    bare = model_only(model_dir, files)
    best_bare = max(v for k, v in bare.items() if k.startswith("ort_bs"))

    stack = BenchStack(model_dir, env={"INFERENCE_BACKEND": "onnx"})
    try:
        first = stack.upload(files[0])  # queued before any worker exists
        t0 = time.perf_counter()
        stack.start_workers(1)
        stack.wait(first, timeout=120, poll=0.01)
        cold = time.perf_counter() - t0

        light = []
        for p in files[1:21]:
            t = time.perf_counter()
            stack.wait(stack.upload(p), poll=0.005)
            light.append(time.perf_counter() - t)
        light_p50 = statistics.median(light)
        one = saturate(stack, files)
        stack.start_workers(1)
        time.sleep(8)  # let the second worker load its model before the load arrives
        two = saturate(stack, files)
    finally:
        stack.stop()
    # The same saturation without heatmaps: how much of the gap is rendering them.
    plain = BenchStack(model_dir, env={"INFERENCE_BACKEND": "onnx", "GRADCAM": "0"})
    try:
        plain.start_workers(1)
        time.sleep(8)
        no_cam = saturate(plain, files)
    finally:
        plain.stop()

    lines = [
        f"\n### {datetime.now(UTC):%Y-%m-%d} e2e, model `{model_dir.name}`, ONNX Runtime, "
        f"threads pool x4 per worker, SQLite, Grad-CAM on\n",
        f"`python {' '.join(sys.argv)}`\n",
        "| measure | value |", "|---|---|",
        *[f"| model-only ONNX Runtime, batch {k[6:]} | {v:.1f} images/s |"
          for k, v in bare.items() if k.startswith("ort_bs")],
        f"| one image alone: decode + preprocess + model + heatmap overlay | {bare['single_image_pipeline_s'] * 1000:.0f} ms |",
        f"| cold start: worker process spawned -> first result | {cold:.2f} s |",
        f"| light load (one at a time), client-measured upload-to-result p50 | {light_p50 * 1000:.0f} ms "
        f"(= single-image pipeline + {(light_p50 - bare['single_image_pipeline_s']) * 1000:.0f} ms) |",
    ]
    for name, r in (("1 worker", one), ("2 workers", two), ("1 worker, no Grad-CAM", no_cam)):
        lines.append(f"| saturation, {args.n} studies, {name}: throughput | {r['throughput']:.1f} studies/s "
                     f"= {r['throughput'] / best_bare:.2f} x best model-only |")
        lines.append(f"| saturation, {name}: end-to-end p50 / p95 / p99, queue wait p50 | "
                     f"{r['p50']:.2f} / {r['p95']:.2f} / {r['p99']:.2f} s, {r['wait_p50']:.2f} s |")
    text = "\n".join(lines) + "\n"
    record(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
