"""A real stack per test: migrations, a Celery worker process and gunicorn, on Redis and SQL."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, TEST_REDIS_URL

BIN = Path(sys.executable).parent


STACK_USER = "stack-admin@example.org"


def provision_api_token(database_url: str, email: str = STACK_USER) -> str:
    """An admin account and a personal API token in a migrated database; returns the token."""
    from webapp import accounts, create_app, tokens
    from webapp.extensions import db

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "CELERY": {"broker_url": TEST_REDIS_URL}})
    with app.app_context():
        user = accounts.find_user(email) or accounts.create_user(
            email, accounts.generate_password(), "admin")
        secret = tokens.create_token(user, "integration tests")[1]
        db.session.remove()
        db.engine.dispose()
    return secret


@dataclass
class Stack:
    """Handles on a running service; requests go out with an admin's API token."""

    base_url: str
    worker: subprocess.Popen | None
    web: subprocess.Popen
    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen]
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """`Authorization: Bearer <token>` of the stack's admin."""
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kwargs: object) -> requests.Response:
        """GET a path (or a full URL) of this stack as its admin."""
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        kwargs.setdefault("timeout", 10)
        return requests.get(url, headers=self.headers, **kwargs)

    def start_worker(self, pool: str = "threads", concurrency: int = 2,
                     extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """(Re)start the worker; the old handle is replaced."""
        self.worker = start_worker({**self.env, **(extra_env or {})}, self.log_dir, pool=pool,
                                   concurrency=concurrency)
        self.procs.append(self.worker)
        return self.worker

    def start_beat(self) -> subprocess.Popen:
        """The sweeper (celery beat), as deployed."""
        log = open(self.log_dir / "beat.log", "ab")
        beat = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker.celery_app", "beat", "--loglevel=INFO",
             f"--schedule={self.log_dir / 'beat-schedule'}"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.procs.append(beat)
        return beat

    def upload(self, *files: tuple[str, bytes], **form: str) -> dict:
        response = requests.post(
            f"{self.base_url}/api/v1/studies",
            files=[("files", (name, content)) for name, content in files],
            data=form,
            headers=self.headers,
            timeout=30,
        )
        assert response.status_code == 202, response.text
        return response.json()

    def wait(self, study_id: str, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(f"/api/v1/studies/{study_id}").json()
            assert "done" in body, f"{body}; web log:\n" + (self.log_dir / "web.log").read_text()[-3000:]
            if body["done"]:
                return body
            time.sleep(0.1)
        raise AssertionError(f"study {study_id} not done after {timeout}s; worker log:\n"
                             + (self.log_dir / "worker.log").read_text()[-4000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(env: dict[str, str], log_dir: Path, name: str = "worker", pool: str = "threads",
                 concurrency: int = 2) -> subprocess.Popen:
    """A real `celery worker` process on the test queue (threads pool, as CPU workers run)."""
    log = open(log_dir / f"{name}.log", "ab")
    return subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--loglevel=INFO",
         f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={env['CELERY_QUEUE']}",
         f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen) -> None:
    """Terminate politely, then kill."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_env(database_url: str, model_dir: Path, queue: str) -> dict[str, str]:
    """The environment a deployment would set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV"))}
    env.update({
        "DATABASE_URL": database_url,
        "REDIS_URL": TEST_REDIS_URL,
        "MODEL_DIR": str(model_dir),
        "CELERY_QUEUE": queue,
        "SECRET_KEY": "integration-test",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


@pytest.fixture
def stack_factory(tmp_path: Path, queue_name: str) -> Iterator:
    """Start a stack on a given database and model directory."""
    procs: list[subprocess.Popen] = []

    def start(database_url: str, model_dir: Path, *, extra_env: dict[str, str] | None = None,
              worker: bool = True, beat: bool = False, pool: str = "threads") -> Stack:
        env = {**build_env(database_url, model_dir, queue_name), **(extra_env or {})}
        subprocess.run([str(BIN / "flask"), "--app", "webapp:create_app", "db", "upgrade"],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        token = provision_api_token(env["DATABASE_URL"])
        port = _free_port()
        web = subprocess.Popen(
            [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2",
             "webapp:create_app()"],
            cwd=REPO, env=env, stdout=open(tmp_path / "web.log", "ab"), stderr=subprocess.STDOUT,
        )
        procs.append(web)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/healthz", timeout=10).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError("web server did not start:\n" + (tmp_path / "web.log").read_text())
        stack = Stack(base, None, web, env, tmp_path, procs, token)
        if worker:
            stack.start_worker(pool=pool)
        if beat:
            stack.start_beat()
        return stack

    yield start
    for proc in procs:
        stop(proc)
    import redis

    redis.Redis.from_url(TEST_REDIS_URL).delete(queue_name)
