"""Shared fixtures: real SQLite and PostgreSQL databases, the real Redis, a tiny real model.

PostgreSQL (TEST_POSTGRES_URL, default postgres@127.0.0.1:5432/test) and Redis
(TEST_REDIS_URL, default 127.0.0.1:6379, database 15 less the pytest-xdist worker's number)
must be running; .ci/run starts them when they are not. Tests that need them fail rather
than skip when they are absent.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parent.parent
CXR_DIR = REPO.parent / "shared" / "data" / "cxr"
FIXTURES = REPO / "tests" / "fixtures"
TEST_POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

def _redis_url() -> str:
    """TEST_REDIS_URL, else a Redis database of each pytest-xdist process's own (15, 14, ...).

    Kombu keeps one index of unacknowledged messages per Redis database, whatever the queue,
    and every worker re-offers the entries older than *its* visibility timeout: a fault test's
    worker (4 s) running beside the lost-worker test (3600 s, so that only the lease recovers)
    handed that test's message back behind its back. Tests in one process run one at a time."""
    if "TEST_REDIS_URL" in os.environ:
        return os.environ["TEST_REDIS_URL"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return f"redis://127.0.0.1:6379/{15 - index % 16}"


TEST_REDIS_URL = _redis_url()
# Small enough to run on 2 cores in seconds; same builder and artifact format as production.
TINY_INPUT_SIZE = 32


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet50 artifact at a tiny input size, made with the real builder,
    with an input gate fitted on its features (tests/gate_fixture.py)."""
    from ml.model import init_artifact
    from tests.gate_fixture import add_gate

    model_dir = tmp_path_factory.mktemp("model") / "tiny"
    init_artifact(model_dir, input_size=TINY_INPUT_SIZE, seed=0)
    add_gate(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The PostgreSQL server used for tests; fails loudly if it is not reachable."""
    engine = sa.create_engine(TEST_POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {TEST_POSTGRES_URL}: {exc}")
    finally:
        engine.dispose()
    return TEST_POSTGRES_URL


def create_postgres_database(server_url: str) -> str:
    """A fresh, empty database on the test server; returns its URL."""
    name = f"covidcxr_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(server_url: str, url: str) -> None:
    """Drop a database made by create_postgres_database, closing stray connections."""
    name = sa.make_url(url).database
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind the service supports."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    server = request.getfixturevalue("postgres_server_url")
    url = create_postgres_database(server)
    try:
        yield url
    finally:
        drop_postgres_database(server, url)


@pytest.fixture
def queue_name() -> str:
    """A queue of this test's own on the shared Redis, so tests never see each other's jobs."""
    return f"test-studies-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app(database_url: str, tiny_model_dir: Path, queue_name: str, tmp_path: Path):
    """The real Flask app on a migrated database (Alembic, not create_all)."""
    from flask_migrate import upgrade

    from webapp import create_app
    from webapp.extensions import db

    flask_app = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": database_url,
            "MODEL_DIR": str(tiny_model_dir),
            "SECRET_KEY": "test-secret",
            "CELERY": {"broker_url": TEST_REDIS_URL, "task_default_queue": queue_name},
            # Per-app limits: tests must not throttle each other through a shared Redis key.
            "RATELIMIT_STORAGE_URI": "memory://",
        }
    )
    with flask_app.app_context():
        upgrade()
    yield flask_app
    with flask_app.app_context():
        db.session.remove()
        db.engine.dispose()
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).delete(queue_name)


CLINICIAN = "clinician@example.org"
ADMIN = "admin@example.org"


@pytest.fixture
def clinician_id(app) -> int:
    """The account the default `client` acts as."""
    from tests.accounts import make_user

    return make_user(app, CLINICIAN)


@pytest.fixture
def client(app, clinician_id):
    """A test client of a clinician with a personal API token (CSRF on, as in production)."""
    from tests.accounts import bearer_client

    return bearer_client(app, CLINICIAN)


@pytest.fixture
def admin_client(app):
    """A test client of an admin, with a personal API token."""
    from tests.accounts import bearer_client, make_user

    make_user(app, ADMIN, role="admin")
    return bearer_client(app, ADMIN)


@pytest.fixture
def anon_client(app):
    """A test client nobody signed in to."""
    return app.test_client()


def fixture_bytes(name: str) -> bytes:
    """A small licensed X-ray shipped in tests/fixtures."""
    return (FIXTURES / name).read_bytes()


def real_xray_paths(n: int, label: str | None = None) -> list[Path]:
    """The first n real X-rays of the shared data set (optionally of one label)."""
    import csv

    with open(CXR_DIR / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if label is None or r["label"] == label]
    return [CXR_DIR / r["file"] for r in rows[:n]]


def png_bytes(size: tuple[int, int] = (64, 64), mode: str = "L") -> bytes:
    """A valid PNG made on the spot."""
    buf = io.BytesIO()
    PILImage.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def post_files(client, files, **form):
    """POST files ([(name, bytes)]) to the upload API as multipart form data."""
    data = {"files": [(io.BytesIO(content), name) for name, content in files], **form}
    return client.post("/api/v1/studies", data=data, content_type="multipart/form-data")
