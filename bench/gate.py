"""What the input gate costs next to the model, per image, on what a worker actually runs.

    .venv/bin/python bench/gate.py [--model-dir models/current] [--backend onnx] [--side 2500]
        [--lanes 1] [--rounds 5]

Model: one backend.forward (probability + features) per batch, divided by the batch size.
Gate: the image statistics on the decoded upload (here real radiographs enlarged to
--side px, as uploads typically are) plus Gate.assess (one projection onto the gate's
principal axes and a softmax) for the same batch, and, for a gate with a feature network of
its own (ml/gate_features.py), that network on the classifier's same input batch (which it
resizes itself), timed as served: Predictor.forward (classifier, then the network) less the
classifier alone, in alternating rounds (the median difference, its range, and the network
timed alone beside them). A gate on the classifier's features pays nothing for them:
they are the pooled output the classifier head reads anyway (compared too: the forward pass
with and without the features output). Appends a table to docs/benchmarks.md (--no-record:
prints it instead, for paired runs that should not each leave one).
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
from record import ROOT, machine, record  # noqa: E402


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
    parser.add_argument("--rounds", type=int, default=5,
                        help="classifier alone and as served, alternately, this many times")
    parser.add_argument("--lanes", type=int, default=1,
                        help="as the worker's INFERENCE_LANES: each run gets CPUs // lanes threads "
                        "(one lane runs here)")
    parser.add_argument("--no-record", action="store_true",
                        help="print the table instead of appending it to docs/benchmarks.md")
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
        bare_s = timed(lambda b=batch: predictor.backend.run(b, explain=False), args.repeats)
        features = predictor.forward(batch, explain=False).features  # the gate's, as served
        stats_s = timed(lambda n=n: [image_statistics(i) for i in images[:n]], args.repeats)
        stats = np.stack([image_statistics(i, a) for i, a in zip(images[:n], attrs, strict=True)])
        # Rounds, each timing the classifier alone and then as served (the classifier's run, then
        # the gate's network, on the same cores: two sessions' thread pools can take cores from
        # each other, which timing the network alone would hide). The network's cost is the
        # median of the rounds' differences; their spread says how far the figure can be trusted.
        model_rounds, served_rounds = [], []
        for _ in range(args.rounds):
            model_rounds.append(timed(lambda b=batch: predictor.backend.forward(b, explain=False),
                                      args.repeats))
            if gate.extractor is not None:
                served_rounds.append(timed(lambda b=batch: predictor.forward(b, explain=False),
                                           args.repeats))
        model_s = statistics.median(model_rounds)
        own_s, alone_s, spread = 0.0, 0.0, (0.0, 0.0)
        if gate.extractor is not None:
            diffs = sorted(s - m for s, m in zip(served_rounds, model_rounds, strict=True))
            own_s, spread = statistics.median(diffs), (diffs[0], diffs[-1])
            alone_s = timed(lambda b=batch: gate.extractor(b), args.repeats)
        assess_s = timed(lambda f=features, s=stats, a=attrs: gate.assess(f, s, a), args.repeats)
        gate_ms, model_ms = (stats_s + own_s + assess_s) * 1000 / n, model_s * 1000 / n
        rows.append((n, model_ms, bare_s * 1000 / n, stats_s * 1000 / n, own_s * 1000 / n,
                     spread[0] * 1000 / n, spread[1] * 1000 / n, alone_s * 1000 / n,
                     assess_s * 1000 / n, gate_ms, gate_ms / model_ms))
    header = ("| batch | model ms/image (probability + features) | model ms/image (probability only) "
              "| image statistics ms | gate's own network ms, as served (rounds' range) "
              "| the network alone ms | assess ms | gate ms/image | gate / model |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {n} | {m:.1f} | {b:.1f} | {s:.2f} | {o:.2f} ({lo:.2f} to {hi:.2f}) | {al:.2f} "
             f"| {a:.3f} | {g:.2f} | {r:.1%} |" for n, m, b, s, o, lo, hi, al, a, g, r in rows]
    text = (f"\n## Input gate cost (bench/gate.py)\n\n{datetime.now(UTC):%Y-%m-%d}, "
            f"{Path(args.model_dir).resolve().name}, backend {predictor.backend.name}, "
            f"{predictor.gate.version}, lanes {args.lanes}, radiographs enlarged to {args.side} px, "
            f"{args.rounds} rounds of median of {args.repeats}. {machine()}.\n\n{header}\n"
            + "\n".join(lines) + "\n")
    record(text, append=not args.no_record)


if __name__ == "__main__":
    main()
