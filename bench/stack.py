"""A throwaway local deployment for benchmarks: embedded Redis, a fresh SQLite or PostgreSQL
database, gunicorn, N Celery workers, an API token; stopped and removed afterwards."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.run_local import free_port, start_embedded_redis, wait_for_port  # noqa: E402

BIN = Path(sys.executable).parent
CXR = ROOT.parent / "shared" / "data" / "cxr"


def real_xrays(n: int) -> list[Path]:
    """n real X-rays spread over the whole data set (every source)."""
    import csv

    with open(CXR / "manifest.csv", newline="") as f:
        files = [CXR / r["file"] for r in csv.DictReader(f)]
    step = max(1, len(files) // n)
    return (files[::step] * (n // len(files[::step]) + 1))[:n]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


class BenchStack:
    """Start with BenchStack(model_dir, ...); use .upload/.wait; always .stop()."""

    def __init__(self, model_dir: str | Path, env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.redis, redis_url = start_embedded_redis()
        self.env = dict(os.environ, DATABASE_URL=f"sqlite:///{self.tmp / 'bench.db'}",
                        REDIS_URL=redis_url, MODEL_DIR=str(Path(model_dir).resolve()),
                        SECRET_KEY="bench", CELERY_QUEUE=f"bench-{uuid.uuid4().hex[:6]}",
                        TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **(env or {}))
        self.log = open(self.tmp / "stack.log", "ab")
        self.workers: list[subprocess.Popen] = []
        self.flask([ "db", "upgrade"])
        self.headers = self._api_headers()
        self.port = free_port()
        self.web = subprocess.Popen(
            [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
             "webapp:create_app()"], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        assert wait_for_port(self.port, 60), "web did not start"
        self.base = f"http://127.0.0.1:{self.port}"
        self.session = requests.Session()
        self.session.headers.update(self.headers)

    def flask(self, args: list[str]) -> str:
        """Run a `flask` CLI command against this stack's database; returns stdout."""
        out = subprocess.run([str(BIN / "flask"), "--app", "webapp:create_app", *args], cwd=ROOT,
                             env=self.env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        return out.stdout

    def _api_headers(self) -> dict[str, str]:
        help_text = subprocess.run([str(BIN / "flask"), "--app", "webapp:create_app", "--help"],
                                   cwd=ROOT, env=self.env, capture_output=True, text=True).stdout
        if "users" not in help_text:
            return {}  # a build without accounts
        self.flask(["users", "create", "bench@example.org", "--generate-password"])
        token = self.flask(["tokens", "create", "bench@example.org", "--name", "bench"]).strip()
        return {"Authorization": f"Bearer {token.splitlines()[-1]}"}

    def start_workers(self, n: int, pool: str = "threads", concurrency: int = 4) -> float:
        """Start n worker processes; returns seconds until all answer a ping."""
        start = time.perf_counter()
        for i in range(n):
            self.workers.append(subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--loglevel=WARNING",
                 f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={self.env['CELERY_QUEUE']}",
                 f"--hostname=bench{i}-{uuid.uuid4().hex[:4]}@%h", "--without-gossip", "--without-mingle"],
                cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT))
        return time.perf_counter() - start

    def stop_workers(self) -> None:
        """Warm-stop every worker."""
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            proc.wait(timeout=60)
        self.workers = []

    def upload(self, path: Path) -> str:
        """POST one X-ray as a study; returns its id."""
        r = self.session.post(f"{self.base}/api/v1/studies",
                              files={"files": (path.name, path.read_bytes())}, timeout=60)
        r.raise_for_status()
        return r.json()["id"]

    def get(self, study_id: str) -> dict[str, Any]:
        """The study's JSON."""
        return self.session.get(f"{self.base}/api/v1/studies/{study_id}", timeout=30).json()

    def wait(self, study_id: str, timeout: float = 600, poll: float = 0.02) -> dict[str, Any]:
        """Poll until the study is done; raises on timeout or failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(study_id)
            if body["done"]:
                if body["status"] != "succeeded":
                    raise RuntimeError(f"study failed: {body.get('error')}")
                return body
            time.sleep(poll)
        raise TimeoutError(study_id)

    def stop(self) -> None:
        """Stop everything this stack started."""
        self.stop_workers()
        self.web.terminate()
        self.web.wait(timeout=30)
        self.redis.terminate()
        self.redis.wait(timeout=30)


def timings(body: dict[str, Any]) -> dict[str, float]:
    """Seconds: queue wait (queued -> started) and end to end (created -> finished), from the API."""
    from datetime import datetime

    t = {k: datetime.fromisoformat(body[k]) for k in ("created_at", "queued_at", "started_at",
                                                     "finished_at")}
    return {"queue_wait": (t["started_at"] - t["queued_at"]).total_seconds(),
            "end_to_end": (t["finished_at"] - t["created_at"]).total_seconds()}
