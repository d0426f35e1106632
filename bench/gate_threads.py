"""How the gate's own network and the classifier share the cores: thread counts and spinning.

    .venv/bin/python bench/gate_threads.py --model-dir DIR (with model.onnx and a gate network)

The classifier's ONNX session (2 threads, spinning on or off) runs a batch, then the gate's
network (1 or 2 threads, spinning on or off) runs on the same batch, as Predictor.forward
does with one lane; printed: the classifier alone in ms per image and what the network adds,
median of 25 rounds. Results: docs/benchmarks.md ("Input gate cost", sixth session).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def session(path: Path, threads: int, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(run, batch: np.ndarray, rounds: int = 25) -> float:
    run(batch)
    run(batch)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True, type=Path)
    args = parser.parse_args()
    block = json.loads((args.model_dir / "gate.json").read_text())["features"]
    outputs = ["covid_probability", "features", "cam"]
    rng = np.random.default_rng(0)
    for spin in (True, False):
        classifier = session(args.model_dir / "model.onnx", 2, spin)
        networks = {f"network {t} thread(s), spinning {s}": session(args.model_dir / block["file"], t, s)
                    for t in (1, 2) for s in (True, False)}
        for size in (1, 4, 8):
            batch = rng.normal(0, 60, (size, 224, 224, 3)).astype(np.float32)

            def classify(b: np.ndarray, c=classifier) -> None:
                c.run(outputs, {"image": b})

            alone = median_ms(classify, batch)
            added = []
            for name, net in networks.items():
                def both(b: np.ndarray, n=net) -> None:
                    classify(b)
                    n.run(None, {"image": b})

                added.append(f"{name} {median_ms(both, batch) / alone - 1:+.0%}")
            print(f"classifier spinning {spin}, batch {size}: {alone:.2f} ms/image; "
                  + ", ".join(added), flush=True)

if __name__ == "__main__":
    main()
