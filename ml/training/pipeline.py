"""What ml.training.train feeds the model: the patient-disjoint split, and the tf.data pipeline.

Images arrive as a cached grey-level array (ml.training.data.load_gray_images); tf.data shuffles them
by the given epoch orders, augments them (rotation, shift, zoom, brightness/contrast; no flips
by default) and batches them, applying the caffe mean exactly as serving does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from ml.preprocess import IMAGENET_BGR_MEAN
from ml.training import data
from ml.training.config import TrainConfig
from ml.training.log import TrainingError
from ml.training.objective import PLAIN, Objective

# Augmentation strengths: ml.training.data.STRENGTHS (shared with ml.training.portable).
STRENGTHS, GAMMA, SHARPNESS, NOISE = data.STRENGTHS, data.GAMMA, data.SHARPNESS, data.NOISE


@dataclass(frozen=True)
class Augmentation:
    """What augment() varies: --augment and --hflip."""

    strength: str = "mild"
    hflip: bool = False


MILD = Augmentation()


def make_split(config: TrainConfig, out: Path) -> dict[str, list[data.Record]]:
    """Load the manifest, make (or reuse) the split, then apply --limit, --exclude-source and
    --exclude-label."""
    try:
        records = data.load_manifest(config.manifest)
    except ValueError as exc:
        raise TrainingError(str(exc)) from exc
    unknown = sorted(set(config.exclude_source) - {r.source for r in records})
    if unknown:
        raise TrainingError(f"--exclude-source: no source named {unknown} in the manifest")
    unknown = sorted(set(config.exclude_label) - {r.label for r in records})
    if unknown:
        raise TrainingError(f"--exclude-label: no label named {unknown} in the manifest")
    pool = data.limit_per_class(records, config.limit) if config.limit else records
    split_file = out / "split.csv" if config.resume else config.split
    try:
        if split_file:
            keep = {r.key for r in pool}
            full = data.read_split(split_file, records)
            split = {name: [r for r in rs if r.key in keep] for name, rs in full.items()}
        else:
            split = data.split_by_patient(pool, config.val_fraction, config.test_fraction, config.seed)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"split: {exc}") from exc
    for name in ("train", "val"):
        split[name] = [
            r
            for r in split[name]
            if r.source not in config.exclude_source and r.label not in config.exclude_label
        ]
        if len({r.target for r in split[name]}) < 2:
            raise TrainingError(
                f"the {name} split needs COVID and non-COVID images; use more data or a "
                "larger --val-fraction"
            )
    return split


def augment(gray: tf.Tensor, seed: tf.Tensor, aug: Augmentation = MILD) -> tf.Tensor:
    """Random affine (rotation, shift, zoom: one interpolation) and brightness/contrast.

    Works on grey levels in [0, 255] of shape (B, H, W, 1), before the caffe mean is taken
    off, so clipping to the valid range stays simple. Stateless: seed fixes the result.
    """
    brightness, contrast = STRENGTHS[aug.strength][3:]
    shape = tf.shape(gray)
    h, w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    u = tf.random.stateless_uniform([shape[0], 7], seed=seed, minval=-1.0, maxval=1.0)
    transforms = data.affine_rows(u, h, w, aug.strength, tf)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=gray,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    if aug.hflip:
        out = tf.where(u[:, 4, None, None, None] > 0.0, tf.reverse(out, axis=[2]), out)
    if aug.strength == "strong":
        out = _acquisition(out, tf.random.experimental.stateless_fold_in(seed, 1))
    mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
    gain = (1.0 + u[:, 5] * contrast)[:, None, None, None]
    offset = (u[:, 6] * brightness * 255.0)[:, None, None, None]
    return tf.clip_by_value((out - mean) * gain + mean + offset, 0.0, 255.0)


def _acquisition(gray: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random gamma, blur or sharpening, and Gaussian noise: what scanners and codecs change."""
    shape = tf.shape(gray)
    u = tf.random.stateless_uniform([shape[0], 3], seed=seed, minval=-1.0, maxval=1.0)
    gamma = tf.exp(u[:, 0] * math.log(GAMMA))[:, None, None, None]
    out = 255.0 * tf.pow(tf.clip_by_value(gray, 0.0, 255.0) / 255.0, gamma)
    # amount < 0 blends towards a 3x3 blur, > 0 away from it (unsharp masking).
    blurred = tf.nn.avg_pool2d(out, ksize=3, strides=1, padding="SAME")
    out = out + (u[:, 1] * SHARPNESS)[:, None, None, None] * (out - blurred)
    sd = (tf.abs(u[:, 2]) * NOISE)[:, None, None, None]
    noise = tf.random.stateless_normal(shape, tf.random.experimental.stateless_fold_in(seed, 2))
    return out + sd * noise


def to_caffe(gray: tf.Tensor) -> tf.Tensor:
    """TF twin of ml.preprocess.to_caffe: the same float32 operations, so the same values."""
    return tf.concat([gray, gray, gray], axis=-1) - tf.constant(IMAGENET_BGR_MEAN, tf.float32)


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    orders: np.ndarray,
    batch_size: int,
    first_step: int,
    seed: int,
    aug: Augmentation,
    objective: Objective = PLAIN,
    ids: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches for the epochs in orders, one row per epoch: (image, label, sample weight), or
    as objective.train_batch structures them with the per-image ids."""
    with tf.device("/cpu:0"):
        images, labels = tf.constant(x[..., None]), tf.constant(y[:, None])
        sample_weights = tf.constant(weights)
        image_ids = tf.constant(ids if ids is not None else np.zeros(len(y), np.int32))
    ds = tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
    )

    def load(step: tf.Tensor, idx: tf.Tensor) -> tuple:
        step_seed = tf.stack([tf.constant(seed, tf.int64), step])
        gray = augment(tf.gather(images, idx), step_seed, aug)
        return objective.train_batch(
            to_caffe(gray),
            tf.gather(labels, idx),
            tf.gather(sample_weights, idx),
            tf.gather(image_ids, idx),
        )

    ds = ds.enumerate(start=first_step)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(2)


def eval_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    objective: Objective = PLAIN,
    ids: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Unaugmented batches, exactly the serving preprocessing (structured by the objective)."""
    ids = ids if ids is not None else np.zeros(len(y), np.int32)
    ds = tf.data.Dataset.from_tensor_slices((x[..., None], y[:, None], ids)).batch(batch_size)
    return ds.map(lambda g, t, i: objective.eval_batch(to_caffe(g), t, i)).prefetch(2)
