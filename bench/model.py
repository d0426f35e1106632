"""Model-only throughput and latency per backend and batch size, against an sgemm roofline
measured in the same run.

    .venv/bin/python bench/model.py --model-dir models/dev [--batches 1 4 8 16] [--seconds 8]

Backends: `keras-predict` (model.predict at batch 1, what most demos do),
`keras` (the compiled tf.function the Keras backend serves), `onnx` (a bare
ONNX Runtime session.run; needs `python -m ml.export MODEL_DIR` first), and
`predictor (onnx)`: what a CPU worker calls per batch (Predictor.predict_batch,
without the heatmap), to compare with the bare session. ResNet50 costs
~4.1 G multiply-adds per 224-px image (scaled by (size/224)^2); the roofline is
float32 matrix multiplication (numpy/OpenBLAS sgemm, 2048^3) on all cores.
Appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import record  # noqa: E402

RESNET50_MACS_224 = 4.09e9


def sgemm_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """Achieved float32 GEMM rate in GFLOP/s (2*n^3 per product)."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def measure(run, batch: np.ndarray, seconds: float) -> tuple[float, float]:
    """(images/s, median batch latency in ms) over a timed loop after two warm-up calls."""
    run(batch)
    run(batch)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t)
    return len(batch) * len(times) / sum(times), statistics.median(times) * 1000


def main() -> None:
    """Run every backend x batch size and record the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/dev")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    from ml.predictor import Predictor

    model_dir = Path(args.model_dir)
    keras_p = Predictor.load(model_dir, backend="keras")
    onnx_p = Predictor.load(model_dir, backend="onnx")
    size = keras_p.metadata.input_size
    gflop_per_image = 2 * RESNET50_MACS_224 * (size / 224) ** 2 / 1e9
    roofline = sgemm_gflops()
    rng = np.random.default_rng(0)
    images = [rng.random((size, size)).astype(np.float32) for _ in range(max(args.batches))]
    model = keras_p.model

    rows = []
    for bs in args.batches:
        batch = keras_p.preprocess(images[:bs])
        runs = {
            "onnx": lambda b: onnx_p.backend.session.run(None, {onnx_p.backend.input_name: b}),
            "predictor (onnx)": lambda b, n=bs: onnx_p.predict_batch(b, images[:n]),
            "keras": lambda b: keras_p.backend.run(b, explain=False),
        }
        if bs == 1:
            runs["keras-predict"] = lambda b: model.predict(b, verbose=0)
        for name, run in runs.items():
            ips, latency = measure(run, batch, args.seconds)
            rows.append((name, bs, ips, latency, ips * gflop_per_image / roofline))
    onnx_best = max(r[2] for r in rows if r[0] == "onnx")
    roofline_after = sgemm_gflops()

    header = (f"\n### {datetime.now(UTC):%Y-%m-%d} model-only, input {size} px, "
              f"{gflop_per_image:.2f} GFLOP/image; sgemm roofline {roofline:.0f} GFLOP/s "
              f"(again after: {roofline_after:.0f})\n\n`python {' '.join(sys.argv)}`\n\n"
              "| backend | batch | images/s | batch latency p50 (ms) | share of sgemm roofline | vs best ONNX |\n"
              "|---|---|---|---|---|---|\n")
    table = "".join(f"| {n} | {bs} | {ips:.1f} | {lat:.1f} | {roof:.0%} | {ips / onnx_best:.2f} |\n"
                    for n, bs, ips, lat, roof in rows)
    record(header + table)


if __name__ == "__main__":
    main()
