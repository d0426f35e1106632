"""The input gate: is this a frontal chest radiograph the classifier may judge? (numpy only).

It scores each image from three things, all cheap next to the forward pass:
the classifier's own pooled features (a third output of that pass), a few
statistics of the decoded pixels, and the DICOM tags decode_image kept. The
fitted parameters live in the model artifact (gate.json + gate.npz, written by
`python -m ml.training.gate`), bound to the weights they were fitted on.
A non-None `reason` means: abstain, no COVID-19 reading for this image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import ArtifactError, ModelMetadata, sha256_file

GATE_FILE = "gate.json"
GATE_ARRAYS_FILE = "gate.npz"
# An int8 variant that is a model of its own (its features are not the float32 model's) has a
# gate of its own, fitted on its features and bound to its file: gate.int8.json + gate.int8.npz.
INT8_VARIANT = "int8"
GATE_FORMAT = 1
# What each code means to a person; the study page shows these words.
REASONS: dict[str, str] = {
    "not_chest_xray": "the image does not look like a chest X-ray",
    "not_frontal": "the image looks like a lateral (side) view",
    "other_modality": "the image looks like another kind of scan (for example CT), not a plain X-ray",
    "inverted": "the image looks inverted (bones dark, air bright)",
    "poor_quality": "the image is blank, badly exposed or too noisy to read",
    "unrecognised": "the image is unlike the chest X-rays the model was trained on",
}
STAT_NAMES = ("mean", "std", "frac_dark", "frac_bright", "autocorr", "entropy", "colourfulness",
              "log_aspect", "symmetry", "centre_minus_frame", "mediastinum_minus_lungs",
              "top_minus_bottom", "grey_levels", "edge_density")
_STAT_SIDE = 128  # statistics are taken on a strided sample of about this many pixels a side
FLAT_STD = 0.02  # a decoded image this uniform holds nothing to read
# DICOM tags that contradict the intended use; tags that agree never overrule the image check.
_XRAY_MODALITIES = {"CR", "DX", "DR", "RG"}
_LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
_CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "PORT CHEST")


@dataclass(frozen=True)
class Assessment:
    """The gate's verdict on one image: reason None means the classifier's answer may be shown."""

    reason: str | None
    frontal_probability: float
    distance: float
    gate_version: str


def image_statistics(pixels: np.ndarray, attributes: Mapping[str, Any] | None = None) -> np.ndarray:
    """STAT_NAMES of a 2-D [0, 1] image (1.0 = white as viewed), from a strided sample."""
    h, w = pixels.shape
    step = max(1, max(h, w) // _STAT_SIDE)
    x = np.asarray(pixels[::step, ::step], np.float32)
    mean, std = float(x.mean()), float(x.std())
    centred = x - mean
    denom = float((centred * centred).mean()) or 1.0
    autocorr = 0.5 * (float((centred[:, 1:] * centred[:, :-1]).mean())
                      + float((centred[1:] * centred[:-1]).mean())) / denom
    hist = np.bincount(np.minimum((x * 32).astype(np.int32), 31).ravel(), minlength=32)
    p = hist[hist > 0] / x.size
    mirrored = centred[:, ::-1]
    symmetry = float((centred * mirrored).mean()) / denom
    hh, ww = x.shape
    inner = x[hh // 4: hh - hh // 4, ww // 4: ww - ww // 4]
    frame_sum = float(x.sum()) - float(inner.sum())
    frame_mean = frame_sum / max(x.size - inner.size, 1)
    band = x[hh // 5: hh - hh // 5]
    mid = band[:, 2 * ww // 5: 3 * ww // 5].mean() if ww >= 5 else band.mean()
    lungs = np.concatenate([band[:, ww // 8: 3 * ww // 10], band[:, 7 * ww // 10: 7 * ww // 8]], 1)
    lung_mean = float(lungs.mean()) if lungs.size else mean
    grad = np.abs(np.diff(x, axis=1))
    attrs = attributes or {}
    return np.array([
        mean, std,
        float((x < 0.05).mean()), float((x > 0.95).mean()),
        autocorr,
        float(-(p * np.log2(p)).sum()) / 5.0,
        float(attrs.get("colourfulness", 0.0) or 0.0),
        math.log(h / w),
        symmetry,
        float(inner.mean()) - frame_mean,
        float(mid) - lung_mean,
        float(x[: hh // 3].mean() - x[2 * hh // 3:].mean()),
        np.count_nonzero(np.bincount(np.rint(x * 255).astype(np.uint8).ravel(), minlength=256))
        / 256.0,  # distinct grey levels (a count of occupied bins: np.unique sorts)
        float((grad > 0.25).mean()) if grad.size else 0.0,
    ], np.float32)


def tag_reason(attributes: Mapping[str, Any] | None) -> str | None:
    """An abstain reason from DICOM tags that contradict a frontal chest X-ray, else None."""
    attrs = attributes or {}
    modality = str(attrs.get("Modality", "")).strip().upper()
    if modality and modality not in _XRAY_MODALITIES:
        return "other_modality"
    view = str(attrs.get("ViewPosition", "")).strip().upper()
    if view in _LATERAL_VIEWS:
        return "not_frontal"
    part = str(attrs.get("BodyPartExamined", "")).strip().upper()
    if part and not any(word in part for word in _CHEST_PARTS):
        return "not_chest_xray"
    return None


def gate_files(variant: str = "") -> tuple[str, str]:
    """(json, npz) file names of the artifact's gate, or of a variant's own ("int8")."""
    return (GATE_FILE, GATE_ARRAYS_FILE) if not variant else (f"gate.{variant}.json",
                                                              f"gate.{variant}.npz")


@dataclass(frozen=True)
class Gate:
    """Fitted gate parameters; build with Gate.load(model_dir, meta)."""

    version: str
    classes: tuple[str, ...]  # classifier outputs; "frontal" is the one that may be answered
    class_reasons: dict[str, str]
    min_frontal_probability: float
    max_distance: float
    feature_mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d): principal axes of training radiographs' features
    component_scale: np.ndarray  # (k,): their standard deviations
    stat_mean: np.ndarray
    stat_scale: np.ndarray
    weights: np.ndarray  # (classes, k + stats)
    bias: np.ndarray  # (classes,)
    info: dict
    # Its own feature network (ml/gate_features.py), or None: it reads the classifier's features.
    extractor: Any = None
    # The polarity model, or None (gates before it): weights over the standardised statistics,
    # then a bias. Where its log-odds that an image is a radiograph's negative are below zero
    # they are added to the "inverted" logit: it can clear a film of being a negative, never
    # accuse one (on photographs and pages its log-odds mean nothing). Fitted on every training
    # radiograph beside its own inversion, it knows polarity alone; the kind classifier's
    # "inverted" class (80 made negatives among thousands of images) also answers to framing
    # and source (docs/experiments/gate, seventh session).
    polarity: np.ndarray | None = None

    @property
    def reads_classifier(self) -> bool:
        """Whether the gate's features are the classifier's pooled output (not its own network's)."""
        return self.extractor is None

    @classmethod
    def load(cls, model_dir: str | Path, meta: ModelMetadata, variant: str = "",
             engine_sha256: str | None = None, threads: int = 1) -> Gate | None:
        """The artifact's gate, or None when it has none; raises ArtifactError if it is unusable.

        variant "int8": the int8 variant's own gate, which must have been fitted on the features
        of the file whose sha256 is engine_sha256 (its json says which). threads: for the gate's
        own feature network, if it has one (as many as each of the classifier's runs gets)."""
        json_name, arrays_name = gate_files(variant)
        path = Path(model_dir) / json_name
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            arrays_path = Path(model_dir) / arrays_name
            if info.get("format") != GATE_FORMAT:
                raise ValueError(f"unknown gate format {info.get('format')}")
            if info.get("weights_sha256") != meta.weights_sha256:
                raise ValueError("it was fitted on other weights; refit it for this model")
            if variant and (engine_sha256 is None or info.get("engine_sha256") != engine_sha256):
                raise ValueError(f"it was fitted on another {variant} export; refit it with "
                                 f"python -m ml.training.gate --model {model_dir} --backend onnx-{variant}")
            if sha256_file(arrays_path) != info.get("arrays_sha256"):
                raise ValueError(f"{arrays_name} does not match its sha256")
            with np.load(arrays_path, allow_pickle=False) as npz:
                arrays = {k: npz[k].astype(np.float32) for k in npz.files}
            polarity = arrays.get("polarity")
            if polarity is not None and polarity.shape != (len(STAT_NAMES) + 1,):
                raise ValueError(f"its polarity model has shape {polarity.shape}")
            extractor = None
            if info.get("features") is not None:
                from ml.gate_features import GateFeatures

                extractor = GateFeatures.load(model_dir, info["features"], threads=threads)
            thresholds = info["thresholds"]
            gate = cls(
                version=str(info["version"]), classes=tuple(info["classes"]),
                class_reasons=dict(info["class_reasons"]),
                min_frontal_probability=float(thresholds["min_frontal_probability"]),
                max_distance=float(thresholds["max_distance"]),
                feature_mean=arrays["feature_mean"], components=arrays["components"],
                component_scale=arrays["component_scale"], stat_mean=arrays["stat_mean"],
                stat_scale=arrays["stat_scale"], weights=arrays["weights"], bias=arrays["bias"],
                info=info, extractor=extractor, polarity=polarity,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError("invalid_model", f"input gate in {model_dir} is unusable: {exc}") from exc
        if "frontal" not in gate.classes or set(gate.class_reasons) != set(gate.classes) - {"frontal"}:
            raise ArtifactError("invalid_model", "input gate classes and reasons do not match")
        if gate.weights.shape != (len(gate.classes), gate.components.shape[0] + len(STAT_NAMES)):
            raise ArtifactError("invalid_model", "input gate weights have the wrong shape")
        return gate

    def inputs(self, features: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whitened feature projections (N, k) and standardised statistics (N, s)."""
        z = (np.asarray(features, np.float32) - self.feature_mean) @ self.components.T
        z /= self.component_scale
        return z, self.standardised(stats)

    def standardised(self, stats: np.ndarray) -> np.ndarray:
        """Image statistics (N, s) as the fitted models read them."""
        return (np.asarray(stats, np.float32) - self.stat_mean) / self.stat_scale

    def polarity_log_odds(self, standardised: np.ndarray) -> np.ndarray | None:
        """Per image, the polarity model's log-odds that it is a radiograph's negative (None: no
        polarity model), from standardised() statistics."""
        if self.polarity is None:
            return None
        return standardised @ self.polarity[:-1] + self.polarity[-1]

    def scores(self, features: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (N, classes) and mean squared Mahalanobis distance (N,)."""
        z, s = self.inputs(features, stats)
        logits = np.concatenate([z, s], axis=1) @ self.weights.T + self.bias
        log_odds = self.polarity_log_odds(s)
        if log_odds is not None:  # it may clear an image of being a negative, never accuse one
            logits[:, self.classes.index("inverted")] += np.minimum(log_odds, 0.0)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities, (z * z).mean(axis=1)

    def assess(self, features: np.ndarray, stats: np.ndarray,
               attributes: Sequence[Mapping[str, Any] | None]) -> list[Assessment]:
        """One Assessment per image; tags and blank images decide first, then the fitted model."""
        probabilities, distances = self.scores(features, stats)
        frontal = self.classes.index("frontal")
        log_odds = self.polarity_log_odds(self.standardised(stats))
        negative = np.ones(len(stats), bool) if log_odds is None else log_odds > 0
        out = []
        for p, d, st, neg, attrs in zip(probabilities, distances, stats, negative, attributes,
                                        strict=True):
            reason = tag_reason(attrs)
            if reason is None and st[STAT_NAMES.index("std")] < FLAT_STD:
                reason = "poor_quality"
            if reason is None and p[frontal] < self.min_frontal_probability:
                # "Inverted" tells the user: a radiograph with its grey levels reversed. Where the
                # polarity model (which knows radiographs and their negatives) says this is no
                # negative, the next kind names the reason: the same abstention, truer words
                # (a white page of text is not an inverted X-ray).
                others = [(q, c) for q, c in zip(p, self.classes, strict=True)
                          if c != "frontal" and (c != "inverted" or neg)]
                reason = self.class_reasons[max(others)[1]]
            if reason is None and d > self.max_distance:
                reason = "unrecognised"
            out.append(Assessment(reason, float(p[frontal]), float(d), self.version))
        return out
