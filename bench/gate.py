"""What the input gate costs next to the model, per image, on what a worker actually runs.

    .venv/bin/python bench/gate.py [--model-dir models/current] [--backend onnx] [--side 2500]
        [--lanes 1]

Model: one backend.forward (probability + features) per batch, divided by the batch size.
Gate: the image statistics on the decoded upload (here real radiographs enlarged to
--side px, as uploads typically are) plus Gate.assess (one projection onto the gate's
principal axes and a softmax) for the same batch, and, for a gate with a feature network of
its own (ml/gate_features.py), that network on the classifier's same input batch (which it
resizes itself), timed as served: Predictor.forward (classifier, then the network) less the
classifier alone. A gate on the classifier's features pays nothing for them:
they are the pooled output the classifier head reads anyway (compared too: the forward pass
with and without the features output). Appends a table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import ROOT, record  # noqa: E402


def timed(run, repeats: int) -> float:
    """Median seconds of run() after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Time model and gate per image at a few batch sizes and record the table."""
    from ml.gate import image_statistics
    from ml.imaging import decode_image
    from ml.predictor import Predictor
    from tests.conftest import real_xray_paths

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "current"))
    parser.add_argument("--backend", default="onnx")
    parser.add_argument("--side", type=int, default=2500)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lanes", type=int, default=1,
                        help="as the worker's INFERENCE_LANES: each run gets CPUs // lanes threads "
                        "(one lane runs here)")
    args = parser.parse_args()
    predictor = Predictor.load(args.model_dir, backend=args.backend, require_gate=True,
                               lanes=args.lanes)
    assert predictor.gate is not None
    decoded = [decode_image(p.read_bytes()) for p in real_xray_paths(max(args.batches))]
    images = [np.clip(np.asarray(Image.fromarray(d.pixels).resize((args.side, args.side)), np.float32), 0, 1)
              for d in decoded]
    gate = predictor.gate
    rows = []
    for n in args.batches:
        batch = predictor.preprocess(images[:n])
        attrs = [d.attributes for d in decoded[:n]]
        model_s = timed(lambda b=batch: predictor.backend.forward(b, explain=False), args.repeats)
        bare_s = timed(lambda b=batch: predictor.backend.run(b, explain=False), args.repeats)
        features = predictor.forward(batch, explain=False).features  # the gate's, as served
        stats_s = timed(lambda n=n: [image_statistics(i) for i in images[:n]], args.repeats)
        stats = np.stack([image_statistics(i, a) for i, a in zip(images[:n], attrs, strict=True)])
        own_s = 0.0
        if gate.extractor is not None:
            # As served: right after the classifier's run, on the same cores (two sessions'
            # thread pools can take cores from each other, which timing it alone would hide).
            both_s = timed(lambda b=batch: predictor.forward(b, explain=False), args.repeats)
            own_s = max(0.0, both_s - model_s)
        assess_s = timed(lambda f=features, s=stats, a=attrs: gate.assess(f, s, a), args.repeats)
        gate_ms, model_ms = (stats_s + own_s + assess_s) * 1000 / n, model_s * 1000 / n
        rows.append((n, model_ms, bare_s * 1000 / n, stats_s * 1000 / n, own_s * 1000 / n,
                     assess_s * 1000 / n, gate_ms, gate_ms / model_ms))
    header = ("| batch | model ms/image (probability + features) | model ms/image (probability only) "
              "| image statistics ms | gate's own network ms | assess ms | gate ms/image "
              "| gate / model |\n|---|---|---|---|---|---|---|---|")
    lines = [f"| {n} | {m:.1f} | {b:.1f} | {s:.2f} | {o:.2f} | {a:.3f} | {g:.2f} | {r:.1%} |"
             for n, m, b, s, o, a, g, r in rows]
    text = (f"\n## Input gate cost (bench/gate.py)\n\n{datetime.now(UTC):%Y-%m-%d}, "
            f"{Path(args.model_dir).resolve().name}, backend {predictor.backend.name}, "
            f"{predictor.gate.version}, lanes {args.lanes}, radiographs enlarged to {args.side} px, "
            f"median of {args.repeats}.\n\n{header}\n" + "\n".join(lines) + "\n")
    record(text)


if __name__ == "__main__":
    main()
