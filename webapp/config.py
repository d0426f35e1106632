"""Configuration: the only module that reads the environment.

Every setting has a default that runs the service locally (SQLite under
``instance/``, Redis on 127.0.0.1:6379, the model in ``models/current``).
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
INSTANCE_DIR = PROJECT_ROOT / "instance"

# Every environment variable this project reads, with its meaning. The compose
# file test checks docker-compose.yml against this list.
ENV_VARS: dict[str, str] = {
    "DATABASE_URL": "SQLAlchemy URL; default sqlite:///instance/covidcxr.db",
    "REDIS_URL": "Celery broker (Redis) URL; default redis://127.0.0.1:6379/0",
    "MODEL_DIR": "model artifact directory served by workers; default models/current",
    "SECRET_KEY": "Flask session/CSRF key; default: random per instance/secret_key file",
    "CELERY_QUEUE": "queue the studies are sent to; default studies",
    "MAX_UPLOAD_MB": "largest request body in MiB; default 64",
    "MAX_IMAGE_MB": "largest single image file in MiB; default 32",
    "MAX_IMAGE_PIXELS": "largest decoded image in pixels; default 60000000",
    "MAX_FILES_PER_STUDY": "most images in one study; default 16",
    "PREPARE_INPUTS": "store each image's model input at intake, so workers need not decode it again (1/0); 200 KB an image until its study is done; default 1",
    "STORE_DICOM_IDENTIFIERS": "store DICOM uploads as sent (1/0); with 0 they are de-identified (PS3.15 Basic Profile) before they are stored; default 0",
    "DICOM_LISTENER": "start the DICOM storage listener with `make run` (1/0); default 0",
    "DICOM_AE_TITLE": "the listener's AE title, also the calling AE title when results are sent; default COVIDCXR",
    "DICOM_BIND": "address the DICOM listener binds; default 127.0.0.1 (docker compose: 0.0.0.0)",
    "DICOM_PORT": "TCP port of the DICOM listener; default 11112",
    "DICOM_ALLOWED_CALLING_AETS": "comma-separated calling AE titles the listener accepts; empty refuses every association; default empty",
    "DICOM_OWNER_EMAIL": "the account that owns studies received over DICOM (the listener does not start without it); default empty",
    "DICOM_SETTLE_S": "seconds without a new image of a StudyInstanceUID before the listener queues it as one study; default 2",
    "PACS_DESTINATION": "where results go back: dicom://AET@host:port (C-STORE) or http(s)://host/dicom-web (STOW-RS); empty sends nothing; default empty",
    "PACS_STOW_AUTHORIZATION": "Authorization header sent with STOW-RS to PACS_DESTINATION (e.g. Basic ...); default none",
    "PACS_TIMEOUT_S": "seconds to connect to, and wait for, the PACS on each send; default 30",
    "PACS_SEND_MAX_ATTEMPTS": "attempts at sending one study's results before the send is marked failed; default 12",
    "PACS_RETRY_BASE_S": "wait before the first retry of a failed send, doubling each time; default 15",
    "PACS_RETRY_MAX_S": "longest wait between two attempts of a send; default 1800",
    "TASK_SOFT_TIME_LIMIT": "seconds before a study task is interrupted; default 300",
    "TASK_MAX_ATTEMPTS": "deliveries of one study before it FAILS; default 3",
    "STALE_AFTER_S": "seconds a QUEUED study may wait, or a RUNNING one run, before the sweeper re-enqueues it; default 600",
    "LEASE_S": "seconds a RUNNING study stays claimed without a heartbeat from its worker; after that the sweeper takes the worker for lost and re-enqueues the study; default 30",
    "HEARTBEAT_S": "seconds between a worker's heartbeats on the studies it is running; at most LEASE_S / 2; default 10",
    "SWEEP_INTERVAL_S": "seconds between sweeper runs (celery beat); default 10",
    "GRADCAM": "compute a Grad-CAM heatmap per image (1/0); default 1",
    "INFERENCE_BACKEND": "auto | onnx | onnx-int8 | keras; auto = Keras where a GPU is visible, else ONNX Runtime int8 where the CPU has VNNI/AMX and the artifact's int8 variant passed parity, else ONNX Runtime float32 if exported, else Keras; default auto",
    "BATCH_MAX_SIZE": "most images one worker process runs through the model at once; default 16",
    "BATCH_MAX_WAIT_MS": "longest a ready image waits for others already being decoded; default 15",
    "INFERENCE_LANES": "batches one worker process runs at once on ONNX Runtime, each on its own share of the CPUs (CPUs / lanes threads); 0 = one lane per CPU; default 0. Keras runs one",
    "VISIBILITY_TIMEOUT_S": "seconds before Redis re-offers a message taken by a worker that has not acknowledged it (one that died before claiming its study); a study whose worker still beats is not taken over; default 60",
    "LOG_LEVEL": "logging level; default INFO",
    "SESSION_COOKIE_SECURE": "send the session cookie over HTTPS only (1/0; browsers treat 127.0.0.1 and localhost as secure); default 1",
    "SESSION_IDLE_MINUTES": "a browser session ends after this many idle minutes; default 480",
    "LOGIN_RATE_LIMIT": "login attempts allowed per client address (Flask-Limiter syntax, kept in Redis); default 10 per minute;100 per hour",
    "LOCKOUT_AFTER_FAILURES": "consecutive failed logins before an account is locked; default 5",
    "LOCKOUT_BASE_S": "first lockout in seconds, doubling with each further failure up to an hour; default 60",
    "API_TOKEN_MAX_DAYS": "longest lifetime of a personal API token in days; default 365",
    "METRICS_PUBLIC": "serve /metrics without authentication (1/0); with 0 an admin session or admin API token is needed; default 1",
    "TRUSTED_PROXIES": "reverse proxies in front of the web server whose X-Forwarded-For/-Proto to trust; default 0",
    "PORT": "port of the local web server started by `make run`; default 5000",
    "WEB_CONCURRENCY": "gunicorn worker processes (docker compose); default 2",
    "WORKER_CONCURRENCY": "studies in flight per worker process (threads pool); default 4",
}


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _non_negative(value: int, name: str) -> int:
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")
    return value


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    return raw not in ("0", "false", "no", "off")


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {raw!r}")
    return value


def _ae_title(value: str, name: str) -> str:
    """An AE title: 1-16 characters of printable ASCII without backslash, not all spaces."""
    value = value.strip()
    if not value or len(value) > 16 or not value.isascii() or not value.isprintable() or "\\" in value:
        raise ValueError(f"{name}: {value!r} is not an AE title (1-16 printable ASCII characters)")
    return value


def _destination(raw: str) -> dict[str, Any] | None:
    """PACS_DESTINATION as {"kind": "dimse", ae_title, host, port} or {"kind": "stow", url}."""
    raw = raw.strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname or not parts.port:
            raise ValueError(f"PACS_DESTINATION must look like dicom://AET@host:port, got {raw!r}")
        ae_title = _ae_title(unquote(parts.username), "PACS_DESTINATION")
        return {"kind": "dimse", "ae_title": ae_title, "host": parts.hostname, "port": parts.port,
                "label": f"dicom://{ae_title}@{parts.hostname}:{parts.port}"}
    if parts.scheme in ("http", "https") and parts.hostname and not parts.username:
        return {"kind": "stow", "url": raw.rstrip("/"), "label": raw.rstrip("/")}
    raise ValueError("PACS_DESTINATION must be dicom://AET@host:port or an http(s) DICOMweb "
                     f"root without credentials, got {raw!r}")


def _choice(env: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = (env.get(name) or default).lower()
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _lease(env: dict[str, str]) -> int:
    """LEASE_S, checked against HEARTBEAT_S: a lease must outlive two missed heartbeats."""
    lease, heartbeat = _int(env, "LEASE_S", 30), _int(env, "HEARTBEAT_S", 10)
    if heartbeat < 1 or lease < 2 * heartbeat:
        raise ValueError(f"HEARTBEAT_S must be at least 1 and at most LEASE_S / 2, got "
                         f"HEARTBEAT_S={heartbeat} LEASE_S={lease}")
    return lease


def _secret_key(env: dict[str, str]) -> str:
    """Read SECRET_KEY, or keep a random one in instance/ so restarts keep sessions."""
    if env.get("SECRET_KEY"):
        return env["SECRET_KEY"]
    path = INSTANCE_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        INSTANCE_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        path.write_text(key)
        path.chmod(0o600)
        return key


@dataclass
class Settings:
    """Typed settings; ``to_flask()`` gives the Flask config mapping."""

    database_url: str
    redis_url: str
    model_dir: Path
    secret_key: str
    celery_queue: str = "studies"
    max_upload_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    max_files_per_study: int = 16
    store_dicom_identifiers: bool = False
    prepare_inputs: bool = True
    dicom_listener: bool = False
    dicom_ae_title: str = "COVIDCXR"
    dicom_bind: str = "127.0.0.1"
    dicom_port: int = 11112
    dicom_allowed_calling_aets: tuple[str, ...] = ()
    dicom_owner_email: str = ""
    dicom_settle_s: float = 2.0
    pacs_destination: dict[str, Any] | None = None
    pacs_stow_authorization: str = ""
    pacs_timeout_s: float = 30.0
    pacs_send_max_attempts: int = 12
    pacs_retry_base_s: float = 15.0
    pacs_retry_max_s: float = 1800.0
    task_soft_time_limit: int = 300
    task_max_attempts: int = 3
    stale_after_s: int = 600
    # A dead worker's study is re-run within about lease_s + sweep_interval_s.
    lease_s: int = 30
    heartbeat_s: int = 10
    sweep_interval_s: int = 10
    gradcam: bool = True
    inference_backend: str = "auto"
    batch_max_size: int = 16
    batch_max_wait_ms: int = 15
    inference_lanes: int = 0
    visibility_timeout_s: int = 60
    log_level: str = "INFO"
    session_cookie_secure: bool = True
    session_idle_minutes: int = 480
    login_rate_limit: str = "10 per minute;100 per hour"
    lockout_after_failures: int = 5
    lockout_base_s: int = 60
    api_token_max_days: int = 365
    metrics_public: bool = True
    trusted_proxies: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from the environment (or a given mapping)."""
        env = dict(os.environ if env is None else env)
        default_db = f"sqlite:///{INSTANCE_DIR / 'covidcxr.db'}"
        model_dir = Path(env.get("MODEL_DIR") or "models/current")
        if not model_dir.is_absolute():
            model_dir = PROJECT_ROOT / model_dir
        return cls(
            database_url=env.get("DATABASE_URL") or default_db,
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            model_dir=model_dir,
            secret_key=_secret_key(env),
            celery_queue=env.get("CELERY_QUEUE") or "studies",
            max_upload_bytes=_int(env, "MAX_UPLOAD_MB", 64) * 1024 * 1024,
            max_image_bytes=_int(env, "MAX_IMAGE_MB", 32) * 1024 * 1024,
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 60_000_000),
            max_files_per_study=_int(env, "MAX_FILES_PER_STUDY", 16),
            store_dicom_identifiers=_flag(env, "STORE_DICOM_IDENTIFIERS", False),
            prepare_inputs=_flag(env, "PREPARE_INPUTS", True),
            dicom_listener=_flag(env, "DICOM_LISTENER", False),
            dicom_ae_title=_ae_title(env.get("DICOM_AE_TITLE") or "COVIDCXR", "DICOM_AE_TITLE"),
            dicom_bind=env.get("DICOM_BIND") or "127.0.0.1",
            dicom_port=_int(env, "DICOM_PORT", 11112),
            dicom_allowed_calling_aets=tuple(
                _ae_title(a, "DICOM_ALLOWED_CALLING_AETS")
                for a in (env.get("DICOM_ALLOWED_CALLING_AETS") or "").split(",") if a.strip()
            ),
            dicom_owner_email=(env.get("DICOM_OWNER_EMAIL") or "").strip(),
            dicom_settle_s=_float(env, "DICOM_SETTLE_S", 2.0),
            pacs_destination=_destination(env.get("PACS_DESTINATION") or ""),
            pacs_stow_authorization=env.get("PACS_STOW_AUTHORIZATION") or "",
            pacs_timeout_s=_float(env, "PACS_TIMEOUT_S", 30.0),
            pacs_send_max_attempts=_int(env, "PACS_SEND_MAX_ATTEMPTS", 12),
            pacs_retry_base_s=_float(env, "PACS_RETRY_BASE_S", 15.0),
            pacs_retry_max_s=_float(env, "PACS_RETRY_MAX_S", 1800.0),
            task_soft_time_limit=_int(env, "TASK_SOFT_TIME_LIMIT", 300),
            task_max_attempts=_int(env, "TASK_MAX_ATTEMPTS", 3),
            stale_after_s=_int(env, "STALE_AFTER_S", 600),
            lease_s=_lease(env),
            heartbeat_s=_int(env, "HEARTBEAT_S", 10),
            sweep_interval_s=_int(env, "SWEEP_INTERVAL_S", 10),
            gradcam=env.get("GRADCAM", "1") not in ("0", "false", "no"),
            inference_backend=_choice(env, "INFERENCE_BACKEND", ("auto", "onnx", "onnx-int8", "keras"), "auto"),
            batch_max_size=_int(env, "BATCH_MAX_SIZE", 16),
            batch_max_wait_ms=_int(env, "BATCH_MAX_WAIT_MS", 15),
            inference_lanes=_non_negative(_int(env, "INFERENCE_LANES", 0), "INFERENCE_LANES"),
            visibility_timeout_s=_int(env, "VISIBILITY_TIMEOUT_S", 60),
            log_level=(env.get("LOG_LEVEL") or "INFO").upper(),
            session_cookie_secure=_flag(env, "SESSION_COOKIE_SECURE", True),
            session_idle_minutes=_int(env, "SESSION_IDLE_MINUTES", 480),
            login_rate_limit=env.get("LOGIN_RATE_LIMIT") or "10 per minute;100 per hour",
            lockout_after_failures=_int(env, "LOCKOUT_AFTER_FAILURES", 5),
            lockout_base_s=_int(env, "LOCKOUT_BASE_S", 60),
            api_token_max_days=_int(env, "API_TOKEN_MAX_DAYS", 365),
            metrics_public=_flag(env, "METRICS_PUBLIC", True),
            trusted_proxies=_int(env, "TRUSTED_PROXIES", 0),
        )

    def to_flask(self) -> dict[str, Any]:
        """Flask config keys, Celery's included (the celery_init_app pattern)."""
        return {
            "SECRET_KEY": self.secret_key,
            "SQLALCHEMY_DATABASE_URI": self.database_url,
            "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": True},
            "MAX_CONTENT_LENGTH": self.max_upload_bytes,
            "MAX_IMAGE_BYTES": self.max_image_bytes,
            "MAX_IMAGE_PIXELS": self.max_image_pixels,
            "MAX_FILES_PER_STUDY": self.max_files_per_study,
            "STORE_DICOM_IDENTIFIERS": self.store_dicom_identifiers,
            "PREPARE_INPUTS": self.prepare_inputs,
            "DICOM_AE_TITLE": self.dicom_ae_title,
            "DICOM_BIND": self.dicom_bind,
            "DICOM_PORT": self.dicom_port,
            "DICOM_ALLOWED_CALLING_AETS": list(self.dicom_allowed_calling_aets),
            "DICOM_OWNER_EMAIL": self.dicom_owner_email,
            "DICOM_SETTLE_S": self.dicom_settle_s,
            "PACS_DESTINATION": self.pacs_destination,
            "PACS_STOW_AUTHORIZATION": self.pacs_stow_authorization,
            "PACS_TIMEOUT_S": self.pacs_timeout_s,
            "PACS_SEND_MAX_ATTEMPTS": self.pacs_send_max_attempts,
            "PACS_RETRY_BASE_S": self.pacs_retry_base_s,
            "PACS_RETRY_MAX_S": self.pacs_retry_max_s,
            "MODEL_DIR": str(self.model_dir),
            "TASK_MAX_ATTEMPTS": self.task_max_attempts,
            "STALE_AFTER_S": self.stale_after_s,
            "LEASE_S": self.lease_s,
            "HEARTBEAT_S": self.heartbeat_s,
            "GRADCAM": self.gradcam,
            "INFERENCE_BACKEND": self.inference_backend,
            "BATCH_MAX_SIZE": self.batch_max_size,
            "BATCH_MAX_WAIT_MS": self.batch_max_wait_ms,
            "INFERENCE_LANES": self.inference_lanes,
            "LOG_LEVEL": self.log_level,
            "SESSION_COOKIE_SECURE": self.session_cookie_secure,
            "SESSION_COOKIE_HTTPONLY": True,
            "SESSION_COOKIE_SAMESITE": "Lax",
            "REMEMBER_COOKIE_SECURE": self.session_cookie_secure,
            "REMEMBER_COOKIE_HTTPONLY": True,
            "PERMANENT_SESSION_LIFETIME": self.session_idle_minutes * 60,
            "SESSION_IDLE_MINUTES": self.session_idle_minutes,
            "RATELIMIT_SWALLOW_ERRORS": True,
            "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
            "RATELIMIT_KEY_PREFIX": "covidcxr",
            "LOGIN_RATE_LIMIT": self.login_rate_limit,
            "LOCKOUT_AFTER_FAILURES": self.lockout_after_failures,
            "LOCKOUT_BASE_S": self.lockout_base_s,
            "API_TOKEN_MAX_DAYS": self.api_token_max_days,
            "METRICS_PUBLIC": self.metrics_public,
            "TRUSTED_PROXIES": self.trusted_proxies,
            "CELERY": {
                "broker_url": self.redis_url,
                "task_ignore_result": True,
                "task_acks_late": True,
                "task_reject_on_worker_lost": True,
                "worker_prefetch_multiplier": 1,
                "task_soft_time_limit": self.task_soft_time_limit,
                "task_time_limit": self.task_soft_time_limit + 30,
                "task_default_queue": self.celery_queue,
                "broker_connection_retry_on_startup": True,
                # A send retries for about 5 s, so a broker restart (make run's Redis is
                # back within 2 s) does not leave an upload QUEUED until STALE_AFTER_S.
                "task_publish_retry_policy": {
                    "max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 2,
                },
                # A message taken by a worker that died before claiming its study comes
                # back after the visibility timeout, looked for every 5 s. Re-offering a
                # message whose study is still running is harmless: claim leaves a study
                # whose worker beats to it (the lease), so this need not cover a task's run.
                "broker_transport_options": {
                    "visibility_timeout": self.visibility_timeout_s,
                    "unacked_restore_interval": 5,
                    "unacked_restore_throttle": 1,
                },
                # No task events: nothing here consumes them, and each study would publish
                # three (received, started, succeeded). `celery worker -E` turns them on for Flower.
                "worker_send_task_events": False,
                "beat_schedule": {
                    "requeue-stale-studies": {
                        "task": "worker.tasks.requeue_stale_studies",
                        "schedule": float(self.sweep_interval_s),
                    },
                    # Results still owed to the PACS: due retries and sends a lost worker left.
                    "resend-pacs-results": {
                        "task": "worker.pacs_tasks.resend_pacs_results",
                        "schedule": float(self.sweep_interval_s),
                    },
                },
            },
        }
