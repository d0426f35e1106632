"""The input gate as a cascade, timed (an experiment, not served): a small network distilled from
the served one screens every image, and the served network runs only on the images it does not
clear (`ml/experiments/gate_distill.py`, its screen.json gives the share cleared).

    .venv/bin/python bench/gate_cascade.py --model-dir M --student S/gate_features.onnx \\
        --cleared 0.5 0.8 [--backend onnx-int8] [--lanes 2] [--batches 1 4 8] [--no-record]

Per batch size n, in alternating rounds, each the median of --repeats runs on the threads a
worker lane gives a network (as served: CPUs // lanes): the classifier's forward pass, the
served gate network on the batch and on each smaller batch the cascade hands it, the student on
the batch. The cascade's network cost per image is the student on n images plus the served network
on the k images of the n it does not clear, k binomial (n, 1 - c) (images cleared independently),
in expectation, each run's time the median over rounds; beside it, the served network's. The image statistics and the
verdict cost the same either way (bench/gate.py times them) and are left out of both.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate import timed  # noqa: E402
from record import ROOT, machine, record  # noqa: E402


def main() -> None:
    from ml.artifact import sha256_file
    from ml.backends import usable_cpus
    from ml.gate_features import SOURCE, GateFeatures
    from ml.imaging import decode_image
    from ml.predictor import Predictor
    from tests.conftest import real_xray_paths

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=str(ROOT / "models" / "current"))
    parser.add_argument("--student", required=True, type=Path, help="the student's ONNX file")
    parser.add_argument("--cleared", type=float, nargs="+", required=True,
                        help="shares of radiographs the screen clears (the experiment's)")
    parser.add_argument("--backend", default="onnx-int8")
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-record", action="store_true",
                        help="print the table instead of appending it to docs/benchmarks.md")
    args = parser.parse_args()
    predictor = Predictor.load(args.model_dir, backend=args.backend, require_gate=True,
                               lanes=args.lanes)
    served = predictor.gate.extractor if predictor.gate is not None else None
    if served is None:
        raise SystemExit(f"{args.model_dir}: its gate has no network of its own to screen for")
    threads = max(1, usable_cpus() // args.lanes) if args.lanes > 1 else usable_cpus()
    student = GateFeatures.load(args.student.parent, {
        "source": SOURCE, "file": args.student.name, "sha256": sha256_file(args.student)},
        threads=threads)
    decoded = [decode_image(p.read_bytes()) for p in real_xray_paths(max(args.batches))]
    images = [np.clip(np.asarray(Image.fromarray(d.pixels), np.float32), 0, 1) for d in decoded]
    rows = []
    for n in args.batches:
        batch = predictor.preprocess(images[:n])
        model, student_s = [], []
        teacher: dict[int, list[float]] = {k: [] for k in range(1, n + 1)}
        for _ in range(args.rounds):
            model.append(timed(lambda b=batch: predictor.backend.forward(b, explain=False),
                               args.repeats))
            for k in teacher:
                teacher[k].append(timed(lambda b=batch[:k]: served(b), args.repeats))
            student_s.append(timed(lambda b=batch: student(b), args.repeats))
        model_ms = statistics.median(model) * 1000 / n
        teacher_ms = {k: statistics.median(v) * 1000 for k, v in teacher.items()}  # per batch
        student_ms = statistics.median(student_s) * 1000 / n
        cascade = [(c, student_ms + sum(math.comb(n, k) * (1 - c) ** k * c ** (n - k) * ms
                                        for k, ms in teacher_ms.items()) / n)
                   for c in args.cleared]
        rows.append((n, model_ms, teacher_ms[n] / n, student_ms, cascade))
    header = ("| batch | classifier ms/image | served network ms/image (share of classifier) "
              "| student ms/image | " + " | ".join(f"cascade, {c:.1%} cleared, ms/image (share)"
                                                  for c in args.cleared)
              + " |\n" + "|---" * (4 + len(args.cleared)) + "|")
    lines = [f"| {n} | {m:.1f} | {t:.2f} ({t / m:.1%}) | {s:.2f} | "
             + " | ".join(f"{x:.2f} ({x / m:.1%})" for _, x in cascade) + " |"
             for n, m, t, s, cascade in rows]
    text = (f"\n### Input gate as a cascade (bench/gate_cascade.py)\n\n{datetime.now(UTC):%Y-%m-%d}, "
            f"{Path(args.model_dir).resolve().name}, backend {predictor.backend.name}, "
            f"{predictor.gate.version}, student {sha256_file(args.student)[:8]}, lanes "
            f"{args.lanes} ({threads} thread(s) a network), {args.rounds} rounds of median of "
            f"{args.repeats}. {machine()}.\n\n{header}\n" + "\n".join(lines) + "\n")
    record(text, append=not args.no_record)


if __name__ == "__main__":
    main()
