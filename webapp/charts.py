"""Dashboard charts drawn on the server as SVG with matplotlib (Figure only, never pyplot): no CDN, no JS."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

BLUE, RED, GREY = "#12355b", "#c0392b", "#8a94a0"


def _figure() -> Any:
    from matplotlib.figure import Figure  # lazy: the web app starts without matplotlib

    fig = Figure(figsize=(7.5, 2.6), dpi=100, layout="constrained")
    fig.patch.set_facecolor("white")
    return fig


def _svg(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def _times(starts: list[str]) -> list[datetime]:
    return [datetime.fromisoformat(s) for s in starts]


def _time_axis(ax: Any, window: str) -> None:
    from matplotlib.dates import DateFormatter

    ax.xaxis.set_major_formatter(DateFormatter("%d %b %H:%M" if window == "week" else "%H:%M"))
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", color="#e5e7ea")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def throughput_svg(data: dict[str, Any]) -> bytes:
    """Stacked bars: studies succeeded and failed per minute, per bucket (UTC)."""
    fig = _figure()
    ax = fig.add_subplot()
    times = _times(data["bucket_starts"])
    per = data["bucket_minutes"]
    ok = [n / per for n in data["succeeded"]]
    bad = [n / per for n in data["failed"]]
    width = per / (24 * 60) * 0.9  # bar width in days (matplotlib's date unit)
    ax.bar(times, ok, width=width, align="edge", color=BLUE, label="succeeded")
    ax.bar(times, bad, width=width, align="edge", bottom=ok, color=RED, label="failed")
    ax.set_ylabel("studies / minute", fontsize=8)
    ax.set_title(f"Studies completed per minute, last {data['window']} (UTC)", fontsize=9)
    ax.set_ylim(bottom=0, top=max([a + b for a, b in zip(ok, bad, strict=True)] + [1]) * 1.15)
    ax.legend(fontsize=7, frameon=False, loc="upper left")
    _time_axis(ax, data["window"])
    return _svg(fig)


def drift_svg(data: dict[str, Any], window: str) -> bytes:
    """Share of images labelled covid per bucket, with the number of predictions behind each point."""
    fig = _figure()
    ax = fig.add_subplot()
    times = _times(data["bucket_starts"])
    points = [(t, s) for t, s in zip(times, data["share"], strict=True) if s is not None]
    counts = ax.twinx()
    counts.bar(times, data["predictions"], width=(times[1] - times[0]) * 0.9 if len(times) > 1 else 0.01,
               align="edge", color=GREY, alpha=0.3)
    counts.set_ylabel("predictions", fontsize=8, color=GREY)
    counts.tick_params(labelsize=8, colors=GREY)
    counts.set_ylim(bottom=0, top=max(data["predictions"] + [1]) * 1.2)
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, color=RED)
    ax.set_ylim(0, 1)
    ax.set_xlim(times[0], times[-1] + (times[1] - times[0]) if len(times) > 1 else None)
    ax.set_ylabel("share labelled covid", fontsize=8)
    ax.set_title(f"COVID-positive share of predictions, last {window} (UTC)", fontsize=9)
    _time_axis(ax, window)
    return _svg(fig)
