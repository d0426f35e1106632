"""The input gate's report: abstention per kind and per source on held-out images, reasons given,
and the COVID-19 model's AUROC on the images it answers versus all (written by ml.training.gate)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml.gate import Gate
from ml.training.gate_data import Sample


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half); nan without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def assess_all(gate: Gate, data: dict[str, np.ndarray], samples: Sequence[Sample]) -> list[str | None]:
    """The gate's reason (None = answered) for every sample; cached samples carry no DICOM tags."""
    return [a.reason for a in gate.assess(data["features"], data["stats"], [None] * len(samples))]


def tables(gate: Gate, samples: Sequence[Sample], data: dict[str, np.ndarray],
           splits: Sequence[str], split: str = "test") -> dict:
    """Abstention per kind (non-frontal), per source (frontal), reasons, and AUROC kept vs all."""
    reasons = assess_all(gate, data, samples)
    rows = [(s, r, i) for i, (s, r, sp) in enumerate(zip(samples, reasons, splits, strict=True))
            if sp == split]
    per_kind, per_source = {}, {}
    for kind in sorted({s.kind for s, _, _ in rows}):
        group = [(s, r) for s, r, _ in rows if s.kind == kind]
        abstained = sum(r is not None for _, r in group)
        entry = {"images": len(group), "abstained": abstained, "rate": abstained / len(group),
                 "ci95": _wilson(abstained, len(group)),
                 "reasons": dict(Counter(r or "answered" for _, r in group))}
        if kind == "frontal":
            for source in sorted({s.source for s, _ in group}):
                sub = [r for s, r in group if s.source == source]
                k = sum(r is not None for r in sub)
                per_source[source] = {"images": len(sub), "abstained": k, "rate": k / len(sub),
                                      "ci95": _wilson(k, len(sub)),
                                      "reasons": dict(Counter(r or "answered" for r in sub))}
        per_kind[kind] = entry
    model_split = [(s, r, i) for s, r, i in rows if s.kind == "frontal" and s.split == split]
    idx = np.array([i for _, _, i in model_split], int)
    kept = np.array([r is None for _, r, _ in model_split], bool)
    positive = np.array([s.label == "covid" for s, _, _ in model_split], bool)
    probability = data["probability"][idx] if len(idx) else np.zeros(0)
    auroc = {"all": {"images": len(idx), "auroc": _auroc(probability, positive)},
             "answered": {"images": int(kept.sum()), "auroc": _auroc(probability[kept], positive[kept])},
             "abstained": {"images": int((~kept).sum()),
                           "covid": int((positive & ~kept).sum())}}
    return {"split": split, "per_kind": per_kind, "per_source": per_source, "auroc": auroc}


def _markdown(result: dict, gate: Gate) -> str:
    chosen_on = gate.info.get("thresholds", {}).get("chosen_on", "validation split")
    lines = [f"# Input gate {gate.version}: measured on the {result['split']} split", "",
             f"Thresholds (chosen on the {chosen_on}): frontal probability >= "
             f"{gate.min_frontal_probability:.4f}, distance <= {gate.max_distance:.3f}.", "",
             "## Non-frontal inputs: abstained per kind", "",
             "| kind | images | abstained | rate | 95% CI | reasons |", "|---|---|---|---|---|---|"]
    for kind, e in result["per_kind"].items():
        if kind != "frontal":
            lines.append(_row(kind, e))
    lines += ["", "## Frontal radiographs: abstained per source", "",
              "| source | images | abstained | rate | 95% CI | reasons |", "|---|---|---|---|---|---|"]
    for source, e in result["per_source"].items():
        lines.append(_row(source, e))
    if "frontal" in result["per_kind"]:
        lines.append(_row("**all frontal**", result["per_kind"]["frontal"]))
    a = result["auroc"]
    lines += ["", "## COVID-19 model on the model's test split", "",
              "| images | n | AUROC |", "|---|---|---|",
              f"| all | {a['all']['images']} | {a['all']['auroc']:.4f} |",
              f"| answered (not abstained) | {a['answered']['images']} | {a['answered']['auroc']:.4f} |",
              f"| abstained | {a['abstained']['images']} ({a['abstained']['covid']} COVID) | |", ""]
    return "\n".join(lines)


def _row(name: str, e: dict) -> str:
    lo, hi = e["ci95"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(e["reasons"].items()))
    return f"| {name} | {e['images']} | {e['abstained']} | {e['rate']:.1%} | {lo:.1%}-{hi:.1%} | {reasons} |"


def write_report(out_dir: Path, gate: Gate, samples: Sequence[Sample], data: dict[str, np.ndarray],
                 splits: Sequence[str]) -> Path:
    """results.json and README-style markdown for the test split, plus the validation figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"gate": gate.info, "test": tables(gate, samples, data, splits, "test"),
              "val": tables(gate, samples, data, splits, "val")}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = _markdown(result["test"], gate) + "\n" + _markdown(result["val"], gate).replace("# ", "## ", 1)
    (out_dir / "results.md").write_text(text)
    return out_dir / "results.md"
