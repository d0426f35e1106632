"""What every bench does with its figures: print them and append them to docs/benchmarks.md,
with the machine they were measured on."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.backends import cpu_flags  # noqa: E402

FLAGS_SHOWN = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def machine() -> str:
    """'CPU: <model>, <n> cores, flags: <the ones that matter for inference>'."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    flags = cpu_flags()
    shown = " ".join(f for f in FLAGS_SHOWN if f in flags) or "none of " + " ".join(FLAGS_SHOWN)
    return f"CPU: {model}, {os.cpu_count()} cores, flags: {shown}"


def record(text: str, append: bool = True) -> None:
    """Print text and, unless append is False (a bench's --no-record), append it to
    docs/benchmarks.md."""
    print(text)
    if append:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(text)
