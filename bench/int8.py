"""float32 against int8 ONNX Runtime on the served model, side by side in one run: throughput at
batch 1 and 8, agreement on the internal test split, cold start and memory.

    .venv/bin/python bench/int8.py --model-dir models/current --manifest ../shared/data/cxr/manifest.csv

Needs both exports (`python -m ml.export MODEL_DIR --int8 --manifest CSV`). Throughput
alternates the two backends in short rounds (median of rounds) so that load from
other processes falls on both alike; the load average is printed with the figures.
Test images only report here: the int8 threshold was chosen on validation at export.
The engines run without the input gate (a variant that changes the gate's decisions
is refused behind it); the gate's decisions on int8 features are measured separately.
Appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import ROOT, machine, record  # noqa: E402

from ml.backends import INT8_INFO_FILE  # noqa: E402
from ml.gate import GATE_ARRAYS_FILE, GATE_FILE  # noqa: E402

BACKENDS = ("onnx", "onnx-int8")


def throughput(predictors: dict, images: list[np.ndarray], batches: list[int], rounds: int,
               seconds: float) -> dict[tuple[str, int], float]:
    """Median images/s per (backend, batch) over rounds that alternate the backends."""
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for bs in batches:
            for name, p in predictors.items():
                batch = p.preprocess(images[:bs])
                p.backend.forward(batch, explain=True)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    p.backend.forward(batch, explain=True)
                    n += bs
                rates.setdefault((name, bs), []).append(n / (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in rates.items()}


def test_split(model_dir: Path, manifest: Path, predictors: dict) -> dict:
    """Agreement and accuracy of both backends on the internal test split."""
    from ml.artifact import read_metadata
    from ml.gate import Gate
    from ml.preprocess import to_caffe
    from ml.training.data import load_manifest, read_split
    from ml.training.int8 import compare, gate_changes, load_images

    meta = read_metadata(model_dir)
    test = read_split(model_dir / "split.csv", load_manifest(manifest))["test"]
    images = load_images([r.path for r in test], [r.target for r in test], meta)
    outs = {}
    for name, p in predictors.items():
        parts = [p.backend.forward(to_caffe(images.gray[i:i + 8]), explain=True)
                 for i in range(0, len(images.gray), 8)]
        outs[name] = {"covid_probability": np.concatenate([o.probability for o in parts]),
                      "cam": np.concatenate([o.cam for o in parts]),
                      "features": np.concatenate([o.features for o in parts])}
    result = compare(outs["onnx"], outs["onnx-int8"], images.targets, meta.threshold)
    gate = Gate.load(model_dir, meta)
    if gate is not None and not gate.reads_classifier:
        # Its own network reads the image, not the classifier's features: int8 changes nothing.
        result["gate"] = {"gate_version": gate.version, "reads": "its own network"}
    elif gate is not None:
        result["gate"] = gate_changes(gate, outs["onnx"]["features"], outs["onnx-int8"]["features"],
                                      images)
    y = images.targets.astype(bool)
    for name, p in predictors.items():
        s = outs[name]["covid_probability"] >= p.threshold
        result[f"{name}_threshold"] = p.threshold
        result[f"{name}_sensitivity"] = float(s[y].mean())
        result[f"{name}_specificity"] = float((~s[~y]).mean())
    return result


COLD = """
import json, sys, time
t = time.perf_counter()
from ml.predictor import Predictor
p = Predictor.load(sys.argv[1], backend=sys.argv[2])
p.warm_up(explain=True)
load_s = time.perf_counter() - t
def status(key):  # VmHWM, not ru_maxrss: the latter survives exec and would be the parent's
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) // 1024
def rss():
    return status("VmRSS")
after_load = rss()
import numpy as np
rng = np.random.default_rng(0)
images = [rng.random((512, 512), dtype=np.float32) for _ in range(8)]
samples = []
for i in range(int(sys.argv[3])):
    p.predict(images, explain=True)
    if i % 10 == 9:
        samples.append(rss())
print(json.dumps({"load_s": load_s, "rss_after_load_mb": after_load, "rss_samples_mb": samples,
                  "peak_rss_mb": status("VmHWM")}))
"""


def cold_start(model_dir: Path, backend: str, batches: int) -> dict:
    """Load + warm-up time and RSS over `batches` predictions of 8 images, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", COLD, str(model_dir), backend, str(batches)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ungated(model_dir: Path, into: Path) -> Path:
    """The artifact without its input gate (links to its files), so either engine loads."""
    into.mkdir()
    for path in model_dir.resolve().iterdir():
        if path.name not in (GATE_FILE, GATE_ARRAYS_FILE) and path.is_file():
            (into / path.name).symlink_to(path)
    return into


def main() -> None:
    """Measure and append the tables."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path("models/current"))
    parser.add_argument("--manifest", type=Path, default=Path("../shared/data/cxr/manifest.csv"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--memory-batches", type=int, default=250)
    args = parser.parse_args()

    from ml.predictor import Predictor

    load_before = os.getloadavg()
    plain = ungated(args.model_dir, Path(tempfile.mkdtemp(prefix="int8-bench-")) / "model")
    predictors = {b: Predictor.load(plain, backend=b) for b in BACKENDS}
    rng = np.random.default_rng(0)
    images = [rng.random((1024, 1024), dtype=np.float32) for _ in range(max(args.batches))]
    rates = throughput(predictors, images, args.batches, args.rounds, args.seconds)
    load_after = os.getloadavg()
    quality = test_split(args.model_dir, args.manifest, predictors)
    cold = {b: cold_start(plain, b, args.memory_batches) for b in BACKENDS}
    info = json.loads((args.model_dir / INT8_INFO_FILE).read_text())

    lines = [
        f"\n### {datetime.now(UTC):%Y-%m-%d} int8 against float32, ONNX Runtime, "
        f"model `{info['model_version']}`\n",
        f"`python {' '.join(sys.argv)}`\n",
        f"{machine()}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after the throughput rounds "
        f"({args.rounds} rounds x {args.seconds:.0f} s per backend and batch, alternating; "
        "median).\n",
        "| batch | float32 images/s | int8 images/s | int8 / float32 |",
        "|---|---|---|---|",
    ]
    for bs in args.batches:
        f, q = rates[("onnx", bs)], rates[("onnx-int8", bs)]
        lines.append(f"| {bs} | {f:.1f} | {q:.1f} | {q / f:.2f} |")
    serving = info["serving"]
    lines += [
        "",
        f"Internal test split ({quality['images']} images; the int8 threshold "
        f"{serving['threshold']:.4f} was chosen on validation at export, the float32 one "
        f"{quality['onnx_threshold']:.4f} at training):\n",
        "| measure | value |", "|---|---|",
        f"| AUROC float32 / int8 / change | {quality['auroc_fp32']:.4f} / {quality['auroc_int8']:.4f} "
        f"/ {quality['auroc_change']:+.4f} |",
        f"| labels agreeing at the float32 threshold | {quality['label_agreement']:.1%} |",
        f"| abs(delta probability) p99 / max / mean | {quality['abs_delta_p99']:.3f} / "
        f"{quality['abs_delta_max']:.3f} / {quality['abs_delta_mean']:.4f} |",
        f"| sensitivity / specificity, float32 at its threshold | {quality['onnx_sensitivity']:.3f} / "
        f"{quality['onnx_specificity']:.3f} |",
        f"| sensitivity / specificity, int8 at its own threshold | "
        f"{quality['onnx-int8_sensitivity']:.3f} / {quality['onnx-int8_specificity']:.3f} |",
        f"| CAM correlation, median / 1st percentile | {quality['cam_correlation_median']:.3f} / "
        f"{quality['cam_correlation_p01']:.3f} |",
        f"| normalised heatmap max abs diff, p99 | {quality['heatmap_max_abs_diff_p99']:.3f} |",
        f"| features relative error, median / p99 | {quality['features_rel_err_median']:.3f} / "
        f"{quality['features_rel_err_p99']:.3f} |",
    ]
    if "gate" in quality:
        g = quality["gate"]
        if "changed" in g:
            lines.append(f"| input gate decisions changed | {g['changed']} of {g['images']} "
                         f"(abstained: float32 {g['abstained_fp32']}, int8 {g['abstained_int8']}) |")
        else:
            lines.append(f"| input gate decisions changed | none can ({g['gate_version']} reads "
                         "its own network, not the classifier's features) |")
    lines += ["", "| backend | cold start: load + warm-up (s) | RSS after load (MB) | RSS after "
              f"{args.memory_batches} batches of 8 with heatmaps (MB, first / last sample) | peak RSS (MB) |",
              "|---|---|---|---|---|"]
    for b in BACKENDS:
        c = cold[b]
        lines.append(f"| {b} | {c['load_s']:.2f} | {c['rss_after_load_mb']} | "
                     f"{c['rss_samples_mb'][0]} / {c['rss_samples_mb'][-1]} | {c['peak_rss_mb']} |")
    text = "\n".join(lines) + "\n"
    record(text)


if __name__ == "__main__":
    main()
