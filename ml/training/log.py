"""How ml.training.train talks to its user: key=value progress lines, and the error for bad inputs.

Kept apart from ml.training.train so that every training module raises the same TrainingError class,
also when ml.training.train itself runs as __main__.
"""

from __future__ import annotations


def log(event: str, **fields: object) -> None:
    """Print one key=value line: counts and settings, never patient identifiers."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text.replace(' ', '_')}")
    print(" ".join(parts), flush=True)


class TrainingError(Exception):
    """A problem with the inputs that the user has to fix."""
