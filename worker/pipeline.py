"""One study through the model: claim, decode, predict, write; short DB sessions throughout."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from flask import current_app
from sqlalchemy import bindparam, delete, exists, select
from sqlalchemy.exc import DBAPIError

from ml.artifact import ArtifactError, ModelMetadata
from ml.imaging import ImageError, Limits, decode_image
from ml.overlay import encode_cam
from ml.prepared import Prepared, input_key, model_batch
from ml.prepared import decode as decode_prepared
from webapp import jobs
from webapp.extensions import db
from webapp.models import Image, PreparedInput, Study
from webapp.pacs.models import DicomOrigin
from webapp.pacs.sends import after_study
from worker.isolation import Isolation
from worker.leases import Leases
from worker.model_cache import get_batcher

log = logging.getLogger(__name__)
_isolation = Isolation()
_leases = Leases()


@dataclass(frozen=True)
class _Loaded:
    image_id: int
    filename: str
    attributes: dict[str, Any] | None
    prepared_key: str | None  # the model input made at intake (ml/prepared.py), if any
    prepared: bytes | None


# The statements a study runs, built once: SQLAlchemy then finds each compiled form by a cache
# key it computed the first time, instead of building the statement and its key per study.
_FROM_PACS = exists().where(DicomOrigin.study_id == bindparam("study_id"))
# The uploads themselves (megabytes each at full size) are read only if they must be decoded.
_IMAGES = (select(Image.id, Image.filename, Image.attributes, PreparedInput.key,
                  PreparedInput.data, _FROM_PACS)
           .outerjoin(PreparedInput, PreparedInput.image_id == Image.id)
           .where(Image.study_id == bindparam("study_id"))
           .order_by(Image.position))
_DATA = select(Image.data).where(Image.study_id == bindparam("study_id")).order_by(Image.position)
_SENT = select(_FROM_PACS)
_ATTEMPTS = select(Study.attempts).where(Study.id == bindparam("study_id"))


# The prepared inputs of finished studies: a re-run (none is planned) would decode the images.
_DROP_PREPARED = delete(PreparedInput).where(
    exists().where(Image.id == PreparedInput.image_id, Study.id == Image.study_id,
                   Study.status.in_(jobs.FINISHED)))


def _load_images(study_id: str) -> tuple[list[_Loaded], bool]:
    """The study's images in order, and whether the PACS sent it (uploads then skip the PACS
    hook's query after the result): one SELECT, and a second only for a study with no images,
    whose failure the PACS must hear of too. Ends the session."""
    params = {"study_id": study_id}
    rows = db.session.execute(_IMAGES, params).all()
    sent = bool(rows[0][5]) if rows else bool(db.session.execute(_SENT, params).scalar())
    db.session.remove()
    return [_Loaded(*row[:5]) for row in rows], sent


def _uploads(study_id: str) -> list[bytes]:
    """The study's uploaded files in order, for decoding. Ends the session."""
    data = list(db.session.scalars(_DATA, {"study_id": study_id}))
    db.session.remove()
    return data


def _prepared(images: list[_Loaded], meta: ModelMetadata) -> list[Prepared] | None:
    """The model inputs made at intake, if every image has one for this model; else None."""
    key = input_key(meta)
    ready = []
    for item in images:
        found = (decode_prepared(item.prepared, meta.input_size)
                 if item.prepared is not None and item.prepared_key == key else None)
        if found is None:
            return None  # another model's, or none: decode them all, as one batch
        ready.append(found)
    return ready


def _fail(token: jobs.Claim, code: str, message: str) -> str:
    jobs.fail(db.session, token, code, message)
    db.session.remove()
    log.info("event=study_failed study=%s code=%s", token.study_id, code)
    return "failed"


def _history(study_id: str) -> int:
    """How often the study was claimed before (0 if unknown)."""
    attempts = db.session.scalar(_ATTEMPTS, {"study_id": study_id})
    db.session.remove()
    return int(attempts or 0)


def run_study(study_id: str) -> str:
    """Process one study; returns what happened ('succeeded', 'failed', 'skipped', 'stale')."""
    config = current_app.config
    # The usual case, a study never claimed before, is claimed in one statement, inside the
    # shared hold (so never beside a suspect running alone). Until it is claimed, a study
    # waiting its turn beats as delivered, so a death of this process while it waits is
    # noticed like the death of a running study.
    with _leases.waiting(study_id, mark_now=_isolation.would_wait(False)), \
            _isolation.hold(exclusive=False):
        token = jobs.claim(db.session, study_id, config["TASK_MAX_ATTEMPTS"],
                           lease_s=config["LEASE_S"], first=True)
        if token is not None:
            outcome, from_pacs = _run(study_id, token, config)
    if token is None:  # claimed before, finished or absent: look first
        suspect = _history(study_id) > 0  # may have killed its last worker: run it alone
        with _leases.waiting(study_id, mark_now=_isolation.would_wait(suspect)), \
                _isolation.hold(exclusive=suspect):
            token = jobs.claim(db.session, study_id, config["TASK_MAX_ATTEMPTS"],
                               lease_s=config["LEASE_S"])
            if token is None:
                db.session.remove()
                log.info("event=study_skipped study=%s", study_id)
                return "skipped"
            outcome, from_pacs = _run(study_id, token, config)
    if from_pacs and outcome in ("succeeded", "failed"):
        after_study(study_id)  # the results (or nothing) back to the PACS
    return outcome


def _run(study_id: str, token: jobs.Claim, config: Any) -> tuple[str, bool]:
    """Work on a claimed study (the claim's session still open); (outcome, from the PACS)."""
    with _leases.hold(token):  # heartbeats until the result or the failure is written
        return _work(study_id, token, config)


def _work(study_id: str, token: jobs.Claim, config: Any) -> tuple[str, bool]:
    started = time.perf_counter()
    from_pacs = False
    try:
        images, from_pacs = _load_images(study_id)
        if not images:
            return _fail(token, "no_images", "the study has no images"), from_pacs
        try:
            batcher = get_batcher(config["MODEL_DIR"], config["INFERENCE_BACKEND"],
                                  config["BATCH_MAX_SIZE"], config["BATCH_MAX_WAIT_MS"],
                                  config["INFERENCE_LANES"])
        except ArtifactError as exc:
            message = "no model installed" if exc.code == "no_model" else exc.message
            return _fail(token, exc.code, message), from_pacs
        with batcher.announce() as ticket:
            ready = _prepared(images, batcher.predictor.metadata)
            if ready is not None:  # made at intake for this model: nothing to decode
                batch, pixels = model_batch(ready), None
                attributes = [item.attributes for item in images]
                statistics = [p.statistics for p in ready]
            else:
                uploads = _uploads(study_id)
                limits = Limits(max_bytes=max(map(len, uploads)) + 1,
                                max_pixels=config["MAX_IMAGE_PIXELS"])
                pixels, attributes, statistics = [], [], []
                for item, data in zip(images, uploads, strict=True):
                    try:
                        decoded = decode_image(data, limits)
                    except ImageError as exc:
                        return _fail(token, exc.code, f"{item.filename}: {exc.message}"), from_pacs
                    pixels.append(decoded.pixels)
                    attributes.append(decoded.attributes)  # DICOM tags and colour, for the gate
                    # The gate's statistics now, while the image is in the CPU's caches.
                    statistics.append(batcher.predictor.statistics(decoded.pixels,
                                                                   decoded.attributes))
                batch = batcher.predictor.preprocess(pixels)  # in this thread: overlaps inference
            results = ticket.submit(batch, pixels, explain=config["GRADCAM"],
                                    timeout=config["CELERY"]["task_soft_time_limit"],
                                    attributes=attributes, statistics=statistics)
        rows = [
            dict(
                image_id=item.image_id,
                probability_covid=r.probability_covid,
                label=r.label,
                threshold=r.threshold,
                model_version=r.model_version,
                model_sha256=r.model_sha256,
                model_trained=r.trained,
                preprocess_version=r.preprocess_version,
                inference_ms=r.inference_ms,
                backend=r.backend,
                heatmap_cam=None if r.cam is None else encode_cam(r.cam),
                abstain_reason=r.abstain_reason,
                gate_version=r.gate_version,
                gate_frontal_probability=r.gate_frontal_probability,
                gate_distance=r.gate_distance,
            )
            for item, r in zip(images, results, strict=True)
        ]
        won = jobs.finish(db.session, token, rows)
        db.session.remove()
    except (SoftTimeLimitExceeded, TimeoutError):
        return _fail(token, "timeout", "processing took longer than the time limit"), from_pacs
    except DBAPIError:
        db.session.remove()
        raise  # transient: the task retries and claims again
    except Exception as exc:  # a bug or a broken model must not leave the study hanging
        log.exception("event=study_error study=%s", study_id)
        db.session.remove()
        message = f"unexpected error while processing ({type(exc).__name__})"
        return _fail(token, "internal_error", message), from_pacs
    elapsed_ms = (time.perf_counter() - started) * 1000
    abstained = sum(r.abstain_reason is not None for r in results)
    log.info("event=study_done study=%s images=%d abstained=%d ms=%.0f won=%s", study_id, len(rows),
             abstained, elapsed_ms, won)
    return ("succeeded" if won else "stale"), from_pacs


def requeue_stale(send: Callable[[str], object],
                  queue_depth: Callable[[], int] | None = None) -> int:
    """Re-enqueue lost studies (no heartbeat for LEASE_S, or past STALE_AFTER_S); returns how many.

    The database says which, the broker is only told. The requeue is guarded
    by the attempt count the sweep read, so a study a new worker claimed in
    the meantime is left to it, and nothing is sent for it.

    With `queue_depth` (messages waiting in the broker's queue), QUEUED studies
    that have waited LEASE_S, held by no worker, are re-sent too when they
    outnumber those messages: some messages were lost (a worker killed between
    taking a message off the queue and recording it keeps no copy anywhere).
    Which ones cannot be told, so all are re-sent; a copy of a message that
    was not lost finds its study claimed and is skipped.
    """
    config = current_app.config
    sent = 0
    lost = jobs.stale_studies(db.session, config["STALE_AFTER_S"], config["LEASE_S"])
    if queue_depth is not None:
        seen = {s.study_id for s in lost}
        unclaimed = [c for c in jobs.unclaimed_studies(db.session, config["LEASE_S"])
                     if c.study_id not in seen]
        try:
            messages = queue_depth() if unclaimed else 0
        except Exception as exc:  # the broker is away: the next sweep looks again
            log.warning("event=queue_depth_failed error=%s", type(exc).__name__)
            messages = len(unclaimed)
        if len(unclaimed) > messages:
            log.warning("event=messages_missing waiting=%d messages=%d", len(unclaimed), messages)
            lost += unclaimed
    for stale in lost:
        was_running = jobs.requeue(db.session, stale.study_id, token=stale)
        if was_running or jobs.touch_queued(db.session, stale.study_id):
            # Logged before the message exists, so no result of the re-run can precede it.
            log.warning("event=study_requeued study=%s attempts=%d was=%s", stale.study_id,
                        stale.token, "running" if was_running else "queued")
            send(stale.study_id)
            sent += 1
    db.session.remove()
    return sent


def drop_prepared() -> int:
    """Delete the prepared inputs (ml/prepared.py) of finished studies; returns how many."""
    dropped = db.session.execute(_DROP_PREPARED).rowcount
    db.session.commit()
    db.session.remove()
    if dropped:
        log.info("event=prepared_dropped images=%d", dropped)
    return dropped
