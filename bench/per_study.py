"""A worker's CPU per study besides the model, phase by phase, on an idle machine.

    .venv/bin/python bench/per_study.py --model-dir models/current -n 300 \
        [--database-url postgresql+psycopg://127.0.0.1/test] [--rounds 3] [--side 2500]

The worker tier's drain (bench/drain.py) is a ratio: the model's time against everything else
a study costs. That "everything else" runs in the task threads, so it is measured here in
isolation: real X-rays stored as studies (every source), then `worker.pipeline.run_study` on
each in turn in one thread, as a task does, timing that thread's CPU (`time.thread_time`).
The model runs in the batcher's lanes (other threads), so it is left out by construction;
what remains is the database path, decoding, preprocessing, the input gate (statistics, verdict),
the batch handover and the result's bookkeeping. Each phase is timed by wrapping the
function the pipeline calls for it (the wrappers cost about a microsecond each).
SQLite by default (a fresh file); any SQLAlchemy URL with --database-url (its tables are
created with Alembic; use an empty database). Appends to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from werkzeug.datastructures import FileStorage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import machine, record  # noqa: E402
from stack import ROOT, real_xrays  # noqa: E402

from scripts.run_local import start_embedded_redis  # noqa: E402

# (module or module:Class, attribute, phase): each is what the pipeline calls for that phase.
PHASES = (
    ("worker.pipeline", "_history", "history"),
    ("webapp.jobs", "claim", "claim"),
    ("worker.pipeline", "_load_images", "load"),
    ("worker.pipeline", "_uploads", "read uploads"),
    ("worker.pipeline", "decode_image", "decode"),
    ("ml.predictor", "preprocess_batch", "preprocess"),
    ("ml.predictor", "image_statistics", "gate statistics"),
    ("worker.pipeline", "_prepared", "read prepared inputs"),
    ("worker.pipeline", "model_batch", "batch from prepared inputs"),
    ("ml.gate:Gate", "assess", "gate verdict"),
    ("webapp.jobs", "finish", "finish"),
)


def timed(phase: str, fn: Callable[..., Any], spent: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.thread_time() - start
    return wrapper


def instrument(spent: dict[str, float]) -> None:
    """Wrap each phase's function where the pipeline looks it up (absent ones are skipped)."""
    import importlib

    for where, attribute, phase in PHASES:
        module_name, _, class_name = where.partition(":")  # "module" or "module:Class"
        owner = importlib.import_module(module_name)
        if class_name:
            owner = getattr(owner, class_name)
        if hasattr(owner, attribute):
            setattr(owner, attribute, timed(phase, getattr(owner, attribute), spent))


def enlarged(paths: list[Path], side: int) -> list[tuple[str, bytes]]:
    """Each X-ray as a PNG of side x side pixels (as full-size uploads are), or as it is (0)."""
    from PIL import Image as PILImage

    files = []
    for path in paths:
        data = path.read_bytes()
        if side:
            with PILImage.open(io.BytesIO(data)) as image:
                out = io.BytesIO()
                image.convert("L").resize((side, side), PILImage.BILINEAR).save(out, "PNG")
                data = out.getvalue()
        files.append((path.name, data))
    return files


def store(app: Any, files: list[tuple[str, bytes]], prepared: bool = True) -> tuple[list[str], float]:
    """Store each X-ray as a study of one image, as an upload does (validated, prepared,
    enqueued); the ids, and the CPU ms per study that took. prepared=False: the prepared inputs
    are deleted afterwards, so the worker decodes (as where the web has no model)."""
    from sqlalchemy import delete

    from webapp.extensions import db
    from webapp.models import PreparedInput
    from webapp.uploads import create_study

    ids, cpu = [], 0.0
    with app.test_request_context():
        for name, data in files:
            upload = FileStorage(stream=io.BytesIO(data), filename=name)
            start = time.thread_time()
            ids.append(create_study([upload]).id)
            cpu += time.thread_time() - start
        if not prepared:
            db.session.execute(delete(PreparedInput))
            db.session.commit()
    return ids, cpu / len(files) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "current")
    parser.add_argument("-n", type=int, default=300, help="studies per round (one image each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--decode", action="store_true",
                        help="no prepared inputs: the worker decodes every image")
    parser.add_argument("--side", type=int, default=0,
                        help="upload each X-ray enlarged to this many pixels a side (0: as shipped)")
    args = parser.parse_args()

    from flask_migrate import upgrade

    from webapp import create_app
    from webapp.extensions import db
    from worker import pipeline

    tmp = Path(tempfile.mkdtemp(prefix="per-study-"))
    server, redis_url = start_embedded_redis()
    url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    queue = f"per-study-{uuid.uuid4().hex[:6]}"
    app = create_app({
        "SQLALCHEMY_DATABASE_URI": url, "MODEL_DIR": str(args.model_dir.resolve()),
        "SECRET_KEY": "bench", "RATELIMIT_STORAGE_URI": "memory://",
        "CELERY": {"broker_url": redis_url, "task_default_queue": queue},
    })
    spent: dict[str, float] = defaultdict(float)
    instrument(spent)
    per_round: list[dict[str, float]] = []
    try:
        with app.app_context():
            upgrade()
            files = enlarged(real_xrays(args.n), args.side)
            for _ in range(2):  # the model's load and first batches: not timed
                for study_id in store(app, files[: args.warmup], not args.decode)[0]:
                    pipeline.run_study(study_id)
            for _ in range(args.rounds):
                ids, upload_ms = store(app, files, not args.decode)
                spent.clear()
                cpu = wall = 0.0
                for study_id in ids:
                    start_cpu, start_wall = time.thread_time(), time.perf_counter()
                    outcome = pipeline.run_study(study_id)
                    cpu += time.thread_time() - start_cpu
                    wall += time.perf_counter() - start_wall
                    if outcome != "succeeded":
                        raise RuntimeError(f"study {study_id}: {outcome}")
                n = len(ids)
                per_round.append({"total": cpu / n * 1000, "wall": wall / n * 1000,
                                  "upload": upload_ms,
                                  **{k: v / n * 1000 for k, v in spent.items()}})
            db.session.remove()
            db.engine.dispose()
    finally:
        server.terminate()
        server.wait(timeout=30)

    phases = [p for _, _, p in PHASES if any(p in r for r in per_round)]
    median = {k: statistics.median(r.get(k, 0.0) for r in per_round)
              for k in ["total", *phases, "wall", "upload"]}
    rest = median["total"] - sum(median[p] for p in phases)
    engine = url.split(":", 1)[0]
    lines = [
        f"\n### {time.strftime('%Y-%m-%d')} per study besides the model, model "
        f"`{args.model_dir.resolve().name}`, {engine}, {args.n} studies x {args.rounds} rounds\n\n",
        f"`python bench/per_study.py --model-dir {args.model_dir} -n {args.n} --rounds "
        f"{args.rounds}{' --database-url ' + engine + '://...' if args.database_url else ''}"
        f"{' --decode' if args.decode else ''}{f' --side {args.side}' if args.side else ''}`\n\n",
        f"{machine()}\n\n",
        "| phase | CPU ms per study (median of rounds) | rounds |\n|---|---|---|\n",
    ]
    def each(key: str) -> str:
        return ", ".join(f"{r.get(key, 0.0):.3f}" for r in per_round)

    for key in phases:
        lines.append(f"| {key} | {median[key]:.3f} | {each(key)} |\n")
    lines.append(f"| the rest (labels, CAMs, handover, leases, logging) | {rest:.3f} | |\n")
    lines.append(f"| **total, the task thread's CPU** | **{median['total']:.3f}** | {each('total')} |\n")
    lines.append(f"| wall per study (the model included, one study at a time) | "
                 f"{median['wall']:.1f} | |\n")
    lines.append(f"| the upload, in the web (decode, prepare, store, enqueue) | "
                 f"{median['upload']:.3f} | {each('upload')} |\n")
    text = "".join(lines)
    record(text, append=not args.no_record)


if __name__ == "__main__":
    main()
