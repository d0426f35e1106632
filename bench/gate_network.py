"""Where the input gate's own network spends its time, and two ways of running it tried against the
served one (evidence for docs/benchmarks.md, "Input gate cost"; nothing here is served).

    .venv/bin/python bench/gate_network.py --model-dir DIR [--rounds 7]

DIR needs the float32 export (`python -m ml.export DIR`) and a gate with a network of its own.
For each thread count and batch size, in alternating rounds (median of 5 runs each, then the
median of the rounds), per image:
- classifier: the classifier's session alone (probability + features);
- network: the gate's network as shipped (`gate_features.onnx`);
- network, input conversion rewritten: the same network with the classifier-to-Lite0 input
  conversion (ml.efficientnet_lite.CaffeToLite: add the mean, flip the channels by
  transposes and ReverseSequence, subtract, divide) replaced by one Gather, one Mul and one
  Add (outputs equal to about 1e-6);
- merged: the gate's network inside the classifier's graph, one session and one thread pool
  (onnx graph surgery in memory), less the classifier alone.
Then ONNX Runtime's profile of the shipped network at one thread, batch 1: time per operator.
Appends the tables to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate import timed  # noqa: E402  (bench/gate.py)
from record import machine, record  # noqa: E402

CONVERSION = ("functional_1/caffe_to_lite_1/add", "functional_1/stem_bn_1/batchnorm/mul_1__25")


def rewritten_conversion(model):
    """The network with its input conversion as Gather + Mul + Add (NCHW, as tf2onnx left it)."""
    import onnx
    from onnx import helper, numpy_helper

    from ml.efficientnet_lite import IMAGENET_BGR_MEAN, INPUT_MEAN, INPUT_STD

    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = [n.name for n in m.graph.node]
    first, last = names.index(CONVERSION[0]), names.index(CONVERSION[1])
    source, target = m.graph.node[first].input[0], m.graph.node[last].output[0]
    mean = np.asarray(IMAGENET_BGR_MEAN, np.float32)[::-1]
    scale = np.full((1, 3, 1, 1), 1.0 / INPUT_STD, np.float32)
    bias = ((mean - INPUT_MEAN) / INPUT_STD).astype(np.float32).reshape(1, 3, 1, 1)
    m.graph.initializer.extend([numpy_helper.from_array(np.array([2, 1, 0], np.int64), "c2l_rgb"),
                                numpy_helper.from_array(scale, "c2l_scale"),
                                numpy_helper.from_array(bias, "c2l_bias")])
    new = [helper.make_node("Gather", [source, "c2l_rgb"], ["c2l_x"], axis=1),
           helper.make_node("Mul", ["c2l_x", "c2l_scale"], ["c2l_y"]),
           helper.make_node("Add", ["c2l_y", "c2l_bias"], [target])]
    kept = [n for k, n in enumerate(m.graph.node) if not first <= k <= last]
    del m.graph.node[:]
    m.graph.node.extend(kept[:first] + new + kept[first:])
    used = {name for node in m.graph.node for name in node.input}
    unused = [i for i in m.graph.initializer if i.name not in used]
    for init in unused:  # the old conversion's constants
        m.graph.initializer.remove(init)
    return m


def merged(classifier, network):
    """The classifier's graph with the gate's network beside it, reading the same input."""
    import onnx

    gate = onnx.compose.add_prefix(network, "gate/")
    image, gate_input = classifier.graph.input[0].name, gate.graph.input[0].name
    for node in gate.graph.node:
        node.input[:] = [image if name == gate_input else name for name in node.input]
    m = onnx.ModelProto()
    m.CopyFrom(classifier)
    m.graph.node.extend(gate.graph.node)
    m.graph.initializer.extend(gate.graph.initializer)
    m.graph.output.extend(gate.graph.output)
    return m, gate.graph.output[0].name


def session(model, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime session on an in-memory model; profile_prefix turns profiling on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def block(run, repeats: int = 5) -> float:
    """bench/gate.py's timing after a pause, so that no pool is left spinning into this block."""
    time.sleep(0.3)
    return timed(run, repeats)


def main() -> None:
    import onnx

    from ml.artifact import read_metadata

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    gate_info = json.loads((args.model_dir / "gate.json").read_text())["features"]
    classifier = onnx.load(str(args.model_dir / "model.onnx"))
    network = onnx.load(str(args.model_dir / gate_info["file"]))
    fast = rewritten_conversion(network)
    both, gate_output = merged(classifier, network)
    size = read_metadata(args.model_dir).input_size
    rng = np.random.default_rng(0)
    rows = []
    for threads in args.threads:
        s_cls, s_net, s_fast, s_both = (session(m, threads) for m in (classifier, network, fast, both))
        image = s_cls.get_inputs()[0].name
        for n in args.batches:
            x = rng.random((n, size, size, 3), dtype=np.float32) * 255 - 120
            reference = s_net.run(None, {"image": x})[0]
            for s, output, feed in ((s_fast, None, "image"), (s_both, [gate_output], image)):
                got = s.run(output, {feed: x})[-1]
                assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max(), "outputs differ"
            runs = {
                "classifier": partial(s_cls.run, ["covid_probability", "features"], {image: x}),
                "network": partial(s_net.run, None, {"image": x}),
                "rewritten": partial(s_fast.run, None, {"image": x}),
                "merged": partial(s_both.run, ["covid_probability", "features", gate_output],
                                  {image: x}),
            }
            times = collections.defaultdict(list)
            for _ in range(args.rounds):
                for name, run in runs.items():
                    times[name].append(block(run) * 1000 / n)
            ms = {name: statistics.median(v) for name, v in times.items()}
            rows.append((threads, n, ms["classifier"], ms["network"], ms["rewritten"],
                         ms["merged"] - ms["classifier"]))
    lines = [f"| {t} | {n} | {c:.1f} | {w:.2f} ({w / c:.1%}) | {r:.2f} ({r / c:.1%}) "
             f"| {m:.2f} ({m / c:.1%}) |" for t, n, c, w, r, m in rows]

    with tempfile.TemporaryDirectory() as tmp:
        s = session(network, 1, profile_prefix=str(Path(tmp) / "gate"))
        x = rng.random((1, size, size, 3), dtype=np.float32) * 255 - 120
        runs = 30
        for _ in range(runs):
            s.run(None, {"image": x})
        events = json.loads(Path(s.end_profiling()).read_text())
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"].get("op_name")] += e["dur"]
    total = sum(per_op.values())
    ops = ", ".join(f"{op} {d / runs / 1000:.2f} ms ({d / total:.0%})" for op, d in per_op.most_common(5))

    record(f"\n## The input gate's network (bench/gate_network.py)\n\n{machine()}. "
           f"{args.model_dir.resolve().name}, network {gate_info['file']} at {gate_info['input_size']} "
           f"px; per image, median of {args.rounds} rounds of median of 5; in brackets, against "
           "the classifier alone at the same threads and batch.\n\n"
           "| threads | batch | classifier ms | network ms | network, conversion rewritten ms "
           "| merged into the classifier's graph, added ms |\n|---|---|---|---|---|---|\n"
           + "\n".join(lines) + f"\n\nProfile, one thread, batch 1 ({total / runs / 1000:.2f} ms "
           f"of kernels per run): {ops}.\n")


if __name__ == "__main__":
    main()
