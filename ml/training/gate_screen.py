"""`python -m ml.training.gate_screen --model M --work W`: the input gate's screen.

The gate's own network (EfficientNet-Lite0 at 128 px, ml/gate_features.py) costs 7-21% of the
classifier's forward pass, most beside the int8 variant (target 10%). The screen is a network
about a seventh of its cost, distilled from it: a plain stack of 3 x 3 convolutions on the grey
plane at 96 px that learns the gate's own terms of the network's features (each class logit's
part from them, and the log distance). Where its scores put an image well inside what the gate
answers it is answered without the gate's network; everything else gets the gate's own verdict
(ml/gate.py, Screen). Alone it let lateral films through; as a screen, with limits chosen on
validation 2-3 logits clear of every non-radiograph, it answered no held-out non-radiograph and
no novel input the gate refuses (docs/experiments/gate/README.md, sixteenth session).

What it learns from is the gate's training split only (validation chooses the limits, test
reports): every training image, `--variants` random crops, flips, rotations and tone changes of
each, `--ood-variants` more of each training lateral film and CT image (a few dozen among
thousands), and `--mixup` mixtures of two training planes (half of them with a lateral film or
CT image), the gate's network's features on each as targets (function matching: a patient
teacher, Beyer et al. 2022). About 45 minutes on two CPU cores. It writes `gate_screen.onnx`
into the artifact and a `screen` block into gate.json (its file, sha256, limits, margin, what
it cleared on validation, and the gate arrays and network it was distilled from); the gate's
version gains `-screen-<sha>`. A refit of the gate drops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import read_metadata, replaced_atomically, sha256_file
from ml.gate import FLAT_STD, GATE_FILE, STAT_NAMES, Gate, image_statistics, logit
from ml.gate_features import SCREEN_FILE, SCREEN_SOURCE, ScreenNetwork
from ml.preprocess import IMAGENET_BGR_MEAN, preprocess_gray, to_caffe
from ml.training.gate import TRAIN_ONLY_SOURCES, _engine, _save_cache, gate_split, gate_splits
from ml.training.gate_data import Sample, all_samples, inverted_pairs

DEFAULT_MARGIN = 3.0  # logits; 2 was the least at which no held-out or novel input got through


def decode_all(samples: Sequence[Sample], model_dir: Path, work: Path, batch: int = 32,
               backend: str = "onnx") -> dict[str, Any]:
    """One decoding pass: the grey plane of every sample at the classifier's input size
    (float16, cached in work/inputs.npz) and what `ml.training.gate.extract` caches (classifier
    features, statistics, COVID probability)."""
    cache = work / "inputs.npz"
    if cache.is_file():
        with np.load(cache) as npz:
            data = {k: npz[k] for k in npz.files}
        if list(data["keys"]) == [s.key for s in samples]:
            return data
    meta = read_metadata(model_dir)
    engine, _ = _engine(model_dir, backend)
    grey = np.empty((len(samples), meta.input_size, meta.input_size), np.float16)
    done: dict[str, tuple] = {}
    start_t = time.perf_counter()
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        loaded = [s.load() for s in chunk]
        planes = np.stack([preprocess_gray(p, meta.input_size, version=meta.preprocess_version)
                           for p, _ in loaded])
        grey[start:start + len(chunk)] = planes
        out = engine.forward(to_caffe(planes), False)
        for s, (pixels, attrs), f, p in zip(chunk, loaded, out.features, out.probability,
                                            strict=True):
            done[s.key] = (f, image_statistics(pixels, attrs), float(p))
        if start // batch % 20 == 0:
            print(f"decoded {start + len(chunk)} of {len(samples)} "
                  f"({time.perf_counter() - start_t:.0f} s)", flush=True)
    keys = np.array([s.key for s in samples])
    stats = np.stack([done[k][1] for k in keys])
    probability = np.array([done[k][2] for k in keys])
    np.savez(cache, keys=keys, grey=grey, stats=stats, probability=probability)
    _save_cache(work / "extract.npz", done)  # the format ml.training.gate.extract reads
    return {"keys": keys, "grey": grey, "stats": stats, "probability": probability}


def variant(plane: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop, flip, small rotation and tone change of a grey plane (0-255)."""
    from PIL import Image

    size = plane.shape[0]
    image = Image.fromarray(plane.astype(np.float32), mode="F")
    if rng.random() < 0.5:
        image = image.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR,
                             fillcolor=float(np.median(plane[:8])))
    side = rng.uniform(0.6, 1.0)
    aspect = rng.uniform(0.85, 1.18)
    w, h = int(size * min(1.0, side * aspect)), int(size * min(1.0, side / aspect))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    image = image.crop((x, y, x + w, y + h)).resize((size, size), Image.Resampling.BILINEAR)
    out = np.asarray(image, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.clip(out / 255.0, 0, 1) ** rng.uniform(0.75, 1.35)
    out = out * rng.uniform(0.85, 1.1) + rng.uniform(-0.06, 0.06)
    return np.clip(out * 255.0, 0, 255)


def variants(grey: np.ndarray, index: np.ndarray, n: int,
             rng: np.random.Generator) -> np.ndarray:
    """n variants of each grey plane grey[index], as float16 (the caches' type)."""
    if n == 0 or len(index) == 0:
        return np.empty((0, *grey.shape[1:]), np.float16)
    return np.stack([variant(grey[i].astype(np.float32), rng)
                     for i in np.repeat(index, n)]).astype(np.float16)


def mixes(grey: np.ndarray, index: np.ndarray, partners: np.ndarray, n: int,
          rng: np.random.Generator) -> np.ndarray:
    """n convex mixtures l * a + (1 - l) * b of grey planes, a from index and b from partners
    (l uniform): inputs between kinds, where the teacher's answer is what the student must learn
    and a few dozen lateral films give it few examples (function matching with mixup, Beyer et
    al. 2022, "Knowledge distillation: a good teacher is patient and consistent")."""
    a = grey[rng.choice(index, n)].astype(np.float32)
    b = grey[rng.choice(partners, n)].astype(np.float32)
    mix = rng.uniform(0.0, 1.0, (n, 1, 1)).astype(np.float32)
    return (mix * a + (1.0 - mix) * b).astype(np.float16)


def teacher(network: Any, grey: np.ndarray, batch: int = 32) -> np.ndarray:
    """The gate's network's features of grey planes (as the classifier's caffe batch)."""
    if len(grey) == 0:
        return np.empty((0, 0), np.float32)
    return np.concatenate([network(to_caffe(grey[i:i + batch].astype(np.float32)))
                           for i in range(0, len(grey), batch)])


def training_set(grey: np.ndarray, kinds: np.ndarray, train: np.ndarray, network: Any,
                 work: Path, n_variants: int = 3, ood_variants: int = 60, mixup: int = 20000,
                 leave_out: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the teacher's features of every sample, extra training planes, the teacher's features
    of each): variants of the training images, more of the training lateral films and CT
    images, mixtures; cached in work. leave_out: a kind none of the extras are made of."""
    targets_path = work / f"targets-v{n_variants}.npz"
    if not targets_path.is_file():
        t0 = time.perf_counter()
        base = teacher(network, grey)
        extra = variants(grey, np.flatnonzero(train), n_variants, np.random.default_rng(0))
        np.savez(targets_path, base=base, extra=extra, extra_features=teacher(network, extra))
        print(f"teacher features: {time.perf_counter() - t0:.0f} s", flush=True)
    with np.load(targets_path) as npz:
        base, extra, extra_features = npz["base"], npz["extra"], npz["extra_features"]
    kept = kinds != leave_out  # every kind unless one is left out
    keep = np.repeat(kept[train], n_variants)  # the variants are of the training images in order
    parts, features = [extra[keep]], [extra_features[keep]]
    ood_kinds = np.isin(kinds, ["lateral_xray", "ct"])
    if ood_variants:
        ood_path = work / f"targets-ood{ood_variants}.npz"
        if not ood_path.is_file():
            index = np.flatnonzero(train & ood_kinds)
            more = variants(grey, index, ood_variants, np.random.default_rng(1))
            np.savez(ood_path, extra=more, extra_features=teacher(network, more))
        keep = np.repeat(kept[train & ood_kinds], ood_variants)
        with np.load(ood_path) as npz:
            parts.append(npz["extra"][keep])
            features.append(npz["extra_features"][keep])
    if mixup:
        mix_path = work / (f"targets-mix{mixup}"
                           + (f"-without-{leave_out}" if leave_out else "") + ".npz")
        if not mix_path.is_file():
            rng = np.random.default_rng(2)
            index = np.flatnonzero(train & kept)
            ood = np.flatnonzero(train & ood_kinds & kept)
            half = mixup // 2 if len(ood) else 0
            more = np.concatenate([mixes(grey, index, ood, half, rng),
                                   mixes(grey, index, index, mixup - half, rng)])
            np.savez(mix_path, extra=more, extra_features=teacher(network, more))
        with np.load(mix_path) as npz:
            parts.append(npz["extra"])
            features.append(npz["extra_features"])
    features = [f for f in features if f.size]
    return base, np.concatenate(parts), (np.concatenate(features) if features
                                         else np.empty((0, base.shape[1]), base.dtype))


def gate_terms(gate: Gate, features: np.ndarray) -> dict[str, np.ndarray]:
    """What the student learns from the gate's network's features: `gate`, the gate's terms
    (each class logit's part from the whitened axes, then the log distance: what
    Gate.terms_scores reads), and `axes`, the whitened coordinates themselves."""
    z = gate.inputs(features, np.zeros((len(features), len(STAT_NAMES))))[0]
    k = gate.components.shape[0]
    return {"axes": z, "gate": np.c_[z @ gate.weights[:, :k].T, np.log((z * z).mean(axis=1))]}


def student_model(size: int, width: int, axes: int, terms: int) -> Any:
    """A plain stack of 3 x 3 convolutions (ONNX Runtime runs them as GEMMs, unlike Lite0's
    depthwise ones), pooled by mean and max, to two outputs: `axes` (the whitened coordinates,
    learnt at a fifth of the weight) and `gate` (the terms)."""
    import keras
    from keras import layers

    def conv(x: Any, filters: int, stride: int = 1, kernel: int = 3) -> Any:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inputs = keras.Input((size, size, 1), name="grey")
    x = conv(layers.Rescaling(2.0, offset=-1.0)(inputs), width, 2)
    x = conv(x, 2 * width, 2)
    x = conv(x, 2 * width)
    x = conv(x, 4 * width, 2)
    x = conv(x, 4 * width)
    x = conv(x, 8 * width, 2)
    x = conv(x, 8 * width)
    x = conv(x, 16 * width, kernel=1)
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    x = layers.Dense(256, activation="relu")(x)
    outputs = {"axes": layers.Dense(axes, name="axes")(x), "gate": layers.Dense(terms, name="gate")(x)}
    return keras.Model(inputs, outputs, name="gate_student")


def resized(grey: np.ndarray, size: int, batch: int = 512) -> np.ndarray:
    """grey/255 resized as the exported network does it (tf.image.resize, bilinear)."""
    import tensorflow as tf

    out = np.empty((len(grey), size, size, 1), np.float16)
    for i in range(0, len(grey), batch):
        x = tf.convert_to_tensor(grey[i:i + batch, ..., None].astype(np.float32) / 255.0)
        out[i:i + batch] = tf.image.resize(x, (size, size), method="bilinear").numpy()
    return out


def train_student(path: Path, x_train: np.ndarray, y_train: dict[str, np.ndarray],
                  x_val: np.ndarray, y_val: dict[str, np.ndarray], size: int, width: int,
                  epochs: int) -> Any:
    """Train and save the student (Huber losses, cosine-decayed Adam, seeded); its history beside it."""
    import keras

    keras.utils.set_random_seed(0)
    model = student_model(size, width, y_train["axes"].shape[1], y_train["gate"].shape[1])
    steps = epochs * int(np.ceil(len(x_train) / 64))
    model.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps,
                                                                               alpha=0.02)),
                  loss={"axes": keras.losses.Huber(1.0), "gate": keras.losses.Huber(1.0)},
                  loss_weights={"axes": 0.2, "gate": 1.0})
    print(f"student: {model.count_params()} parameters, {len(x_train)} training inputs", flush=True)
    t0 = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=64, epochs=epochs,
                        validation_data=(x_val, y_val) if len(x_val) else None, verbose=2,
                        shuffle=True)
    model.save(path)
    (path.parent / "history.json").write_text(json.dumps(
        {**{k: [float(v) for v in vs] for k, vs in history.history.items()},
         "seconds": time.perf_counter() - t0}, indent=1))
    return model


def export_screen(model: Any, model_dir: Path, size: int) -> dict[str, Any]:
    """The student's terms as the screen's network file: the classifier's caffe batch in."""
    import tensorflow as tf
    import tf2onnx

    source = read_metadata(model_dir).input_size
    spec = (tf.TensorSpec([None, source, source, 3], tf.float32, name="image"),)
    mean0 = float(IMAGENET_BGR_MEAN[0])

    @tf.function(input_signature=spec)
    def graph(image: tf.Tensor) -> dict[str, tf.Tensor]:
        # Resize first (linear, so it commutes with the affine map): the element-wise work is
        # then done on size x size values, not 224 x 224 x 3 (1.3 of 1.9 ms at batch 1).
        small = tf.image.resize(image, (size, size), method="bilinear")[..., :1]
        return {"terms": tf.identity(model((small + mean0) * (1.0 / 255.0),
                                           training=False)["gate"], name="terms")}

    with replaced_atomically(model_dir / SCREEN_FILE) as tmp:
        tf2onnx.convert.from_function(graph, input_signature=spec, opset=17, output_path=tmp)
    return {"source": SCREEN_SOURCE, "file": SCREEN_FILE,
            "sha256": sha256_file(model_dir / SCREEN_FILE), "input_size": size,
            "reads": f"the grey plane of the classifier's {source} px input batch"}


def screen_limits(p: np.ndarray, d: np.ndarray, frontal: np.ndarray,
                  margin: float) -> tuple[float, float, float]:
    """The screen's limits from validation scores: (minimum logit P(frontal), maximum distance,
    share of radiographs cleared). Every non-radiograph must fall outside, `margin` logits short
    of the limit (an image is cleared above it); of all such pairs, the one that clears the most
    radiographs."""
    lp = logit(p)
    best = (np.inf, 0.0, 0.0)
    for d_max in np.quantile(d[frontal], np.linspace(0.05, 1.0, 96)):
        inside = ~frontal & (d <= d_max)
        # With no non-radiograph inside, any limit below every radiograph clears them all.
        p_min = lp[inside].max() + margin if inside.any() else lp[frontal].min() - 1.0
        cleared = float(np.mean((lp[frontal] > p_min) & (d[frontal] <= d_max)))
        if cleared > best[2]:
            best = (float(p_min), float(d_max), cleared)
    return best


def run_screen(network: ScreenNetwork | Any, grey: np.ndarray, batch: int = 64) -> np.ndarray:
    """The screen's terms of grey planes, through its network file as served."""
    return np.concatenate([network(to_caffe(grey[i:i + batch].astype(np.float32)))
                           for i in range(0, len(grey), batch)])


def fit_screen(model_dir: Path, work: Path, samples: Sequence[Sample], splits: Sequence[str],
               margin: float = DEFAULT_MARGIN, size: int = 96, width: int = 16, epochs: int = 14,
               n_variants: int = 3, ood_variants: int = 60, mixup: int = 20000,
               student: Path | None = None, backend: str = "onnx") -> dict[str, Any]:
    """Distil, export and bind the screen of model_dir's gate (trained on the samples of split
    "train", limits from those of "val"); returns gate.json's new screen block. student: an
    already trained student (.keras) to use instead of training one; backend: the classifier's,
    for the decoding pass (its features and probability are cached for ml.training.gate)."""
    import keras

    model_dir, work = Path(model_dir), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(model_dir)
    gate = Gate.load(model_dir, meta, threads=2)
    if gate is None or gate.extractor is None:
        raise SystemExit(f"{model_dir}: a screen needs a gate with a network of its own "
                         "(python -m ml.training.gate --model DIR --features imagenet)")
    data = decode_all(samples, model_dir, work, backend=backend)
    splits = np.asarray(splits)
    kinds = np.array([s.kind for s in samples])
    train, val = splits == "train", splits == "val"
    base, extra, extra_features = training_set(data["grey"], kinds, train, gate.extractor, work,
                                               n_variants, ood_variants, mixup)
    path = student or work / f"screen-{size}-{width}-v{n_variants}-ood{ood_variants}-mix{mixup}.keras"
    if Path(path).is_file():
        model = keras.models.load_model(path)
    else:
        x_train = resized(np.concatenate([data["grey"][train], extra]), size)
        y_train = gate_terms(gate, np.concatenate([base[train], extra_features]))
        model = train_student(Path(path), x_train, y_train, resized(data["grey"][val], size),
                              gate_terms(gate, base[val]), size, width, epochs)
    block = export_screen(model, model_dir, size)
    terms = run_screen(ScreenNetwork.load(model_dir, block), data["grey"][val])
    stats = data["stats"][val]
    p, d = gate.terms_scores(terms, stats)
    frontal = kinds[val] == "frontal"
    blank = stats[:, STAT_NAMES.index("std")] < FLAT_STD  # never cleared: left out of the choice
    p_frontal = p[:, gate.classes.index("frontal")]
    p_min, d_max, _ = screen_limits(p_frontal[~blank], d[~blank], frontal[~blank], margin)
    cleared = (logit(p_frontal) > p_min) & (d <= d_max) & ~blank  # as Gate.cleared decides
    info_path = model_dir / GATE_FILE
    info = json.loads(info_path.read_text(encoding="utf-8"))
    block.update({
        "gate_arrays_sha256": info["arrays_sha256"],
        "gate_network_sha256": info["features"]["sha256"],
        "limits": {"min_logit_frontal": p_min, "max_distance": d_max, "margin": margin,
                   "chosen_on": f"validation split: every non-radiograph within the distance "
                                f"at least {margin:g} logits below the limit"},
        "validation": {"radiographs": int(frontal.sum()),
                       "radiographs_cleared": int(cleared[frontal].sum()),
                       "others": int((~frontal).sum()),
                       "others_cleared": int(cleared[~frontal].sum())},
        "training": {"images": int(train.sum()), "variants": n_variants,
                     "ood_variants": ood_variants, "mixup": mixup, "size": size, "width": width,
                     "epochs": epochs, "parameters": int(model.count_params())},
    })
    info["version"] = f"{info['version'].split('-screen-')[0]}-screen-{block['sha256'][:8]}"
    info["screen"] = block
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"screen {block['sha256'][:8]}: logit P(frontal) > {p_min:.3f}, distance <= "
          f"{d_max:.3f}; clears {cleared[frontal].mean():.1%} of {int(frontal.sum())} validation "
          f"radiographs and {int(cleared[~frontal].sum())} of {int((~frontal).sum())} others; "
          f"gate version {info['version']}", flush=True)
    return block


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.training.gate_screen",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path,
                        help="scratch folder: decoded inputs, the teacher's features, the student")
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    parser.add_argument("--student", type=Path, help="a trained student (.keras): do not train one")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--variants", type=int, default=3)
    parser.add_argument("--ood-variants", type=int, default=60)
    parser.add_argument("--mixup", type=int, default=20000)
    args = parser.parse_args(argv)
    samples = all_samples(args.model, args.cxr, args.ood, train_fraction=1.0,
                          keep_sources=TRAIN_ONLY_SOURCES)
    samples += inverted_pairs([s for s in samples if s.kind == "frontal" and gate_split(s) == "train"])
    fit_screen(args.model, args.work, samples, gate_splits(samples, "cross-validated"),
               args.margin, args.size, args.width, args.epochs, args.variants,
               args.ood_variants, args.mixup, args.student)
    return 0


if __name__ == "__main__":
    sys.exit(main())
