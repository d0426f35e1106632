"""Grad-CAM heatmaps for the COVID-19 classifier and their overlay on the X-ray."""

from __future__ import annotations

import io
from collections.abc import Callable

import keras
import matplotlib  # colormaps only: no pyplot, so no GUI backend is ever loaded
import numpy as np
import tensorflow as tf
from PIL import Image

from ml.model import LAST_CONV_LAYER

_EPS = 1e-12


def _is_sigmoid_dense(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.sigmoid


def make_grad_cam(
    model: keras.Model, layer_name: str = LAST_CONV_LAYER
) -> Callable[[np.ndarray], np.ndarray]:
    """Compile Grad-CAM for this model once; the returned function maps a preprocessed batch to maps."""
    head = model.layers[-1]
    # Differentiate the logit, not the sigmoid: a saturated sigmoid (p ~ 0 or 1) has a
    # vanishing gradient and would give an all-zero map although the evidence is strong.
    use_logit = _is_sigmoid_dense(head)
    target = head.input if use_logit else model.output
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, target])
    size = model.input_shape[1:]

    # Traced once per model (free batch size): eager GradientTape costs several times more.
    @tf.function(input_signature=[tf.TensorSpec([None, *size], tf.float32)])
    def cams(inputs: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            activations, out = grad_model(inputs, training=False)
            score = tf.matmul(out, head.kernel) + head.bias if use_logit else out
            # Images do not interact at inference (BatchNorm uses moving stats), so the gradient
            # of the sum w.r.t. each image's activations is that image's own gradient.
            total = tf.reduce_sum(score)
        grads = tape.gradient(total, activations)
        channel_weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(channel_weights * activations, axis=-1))

    def run(batch: np.ndarray) -> np.ndarray:
        cam = cams(tf.convert_to_tensor(batch, dtype=tf.float32)).numpy()
        cam = np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
        # Divide (not multiply by 1/peak) so each map peaks at exactly 1.0; flat maps become zeros.
        normalised = np.where(peak > _EPS, cam / np.where(peak > _EPS, peak, 1.0), 0.0)
        return np.clip(normalised, 0.0, 1.0).astype(np.float32)

    return run


def grad_cam(
    model: keras.Model, batch: np.ndarray, layer_name: str = LAST_CONV_LAYER
) -> np.ndarray:
    """Return (N, h, w) float32 Grad-CAM maps in [0, 1] for the "covid" output of a preprocessed batch."""
    return make_grad_cam(model, layer_name)(batch)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D float array to (width, height) with Pillow bilinear."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_png(
    pixels: np.ndarray, heatmap: np.ndarray, max_side: int = 512, alpha: float = 0.4
) -> bytes:
    """Blend a "jet" heatmap over a 2-D [0, 1] X-ray and return RGB PNG bytes, longest side <= max_side."""
    if pixels.ndim != 2 or heatmap.ndim != 2 or pixels.size == 0 or heatmap.size == 0:
        raise ValueError(f"expected non-empty 2-D arrays, got {pixels.shape} and {heatmap.shape}")
    if max_side < 1 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"need max_side >= 1 and alpha in [0, 1], got {max_side}, {alpha}")
    height, width = pixels.shape
    ratio = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * ratio)), max(1, round(height * ratio)))

    gray = np.clip(np.nan_to_num(_resize(pixels, size)), 0.0, 1.0)
    heat = np.clip(np.nan_to_num(_resize(heatmap, size)), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    blended = (1.0 - alpha) * gray[..., None] + alpha * colours
    rgb = np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
