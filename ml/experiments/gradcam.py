"""Grad-CAM heatmaps for the COVID-19 classifier and their overlay on the X-ray."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from ml.model import LAST_CONV_LAYER
from ml.overlay import normalise_maps, overlay_png  # noqa: F401  (overlay_png re-exported)


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
        return normalise_maps(cams(tf.convert_to_tensor(batch, dtype=tf.float32)).numpy())

    return run


def grad_cam(
    model: keras.Model, batch: np.ndarray, layer_name: str = LAST_CONV_LAYER
) -> np.ndarray:
    """Return (N, h, w) float32 Grad-CAM maps in [0, 1] for the "covid" output of a preprocessed batch."""
    return make_grad_cam(model, layer_name)(batch)
