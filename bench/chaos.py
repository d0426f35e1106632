"""Chaos under load: SIGKILL `make run`'s worker again and again (and its embedded Redis once)
while studies keep coming. Every study must finish within --bound-s of each kill that found it
pending, none lost, none with two results, and the web must answer /healthz throughout.

    .venv/bin/python bench/chaos.py --kills 20 --redis-restart

Runs scripts/run_local.py itself (what `make run` runs: embedded Redis, one worker with the
threads pool x4, beat, gunicorn) on a fresh SQLite database and a free port, with default
recovery settings, serving an untrained 64 px model with a quick input gate (made once in
bench/out/chaos-model; the launcher exports it to ONNX). Only 127.0.0.1 traffic. It stops by
itself: after the kills and the drain, and at --max-minutes whatever happens. Prints the
figures as a Markdown block for docs/benchmarks.md; exit status 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import BIN, CXR, ROOT, percentile, real_xrays  # noqa: E402

sys.path.insert(0, str(ROOT))
from scripts.run_local import free_port  # noqa: E402

MODEL = ROOT / "bench" / "out" / "chaos-model"


def make_model(model_dir: Path) -> None:
    """An untrained 64 px artifact with a quick input gate, made once."""
    if (model_dir / "gate.json").exists():
        return
    py = str(BIN / "python")
    subprocess.run([py, "-m", "ml.model", "--init", str(model_dir), "--input-size", "64"], cwd=ROOT,
                   check=True)
    fixtures = sorted((ROOT / "tests" / "fixtures").glob("*.png"))
    subprocess.run([py, "-c", "import sys; from pathlib import Path; "
                    "from ml.training.gate_quick import fit_quick_gate; "
                    "fit_quick_gate(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "
                    "[Path(p) for p in sys.argv[4:]])",
                    str(model_dir), str(CXR), str(CXR.parent / "ood"), *map(str, fixtures)],
                   cwd=ROOT, check=True)


def service_pid(launcher: subprocess.Popen, name: str) -> psutil.Process | None:
    """The launcher's child running the worker, beat or Redis."""
    for child in psutil.Process(launcher.pid).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by the launcher
                continue
            cmd = child.cmdline()
            if name == "redis" and child.name() == "redis-server":
                return child
            if "worker.celery_app" in cmd and cmd[cmd.index("worker.celery_app") + 1] == name:
                return child
        except (psutil.NoSuchProcess, ValueError, IndexError):
            continue
    return None


class Health(threading.Thread):
    """GET /healthz every 0.2 s: polls, failures (refused, errors, non-200), slowest answer."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.polls, self.failures, self.slowest = base, 0, [], 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            started = time.monotonic()
            try:
                status = requests.get(f"{self.base}/healthz", timeout=30).status_code
                if status != 200:
                    self.failures.append((time.time(), status))
            except requests.RequestException as exc:
                self.failures.append((time.time(), type(exc).__name__))
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.polls += 1


class Load(threading.Thread):
    """Keeps `in_flight` studies pending (1-2 real X-rays each) until stopped."""

    def __init__(self, base: str, token: str, db: sa.Engine, in_flight: int) -> None:
        super().__init__(daemon=True)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.base, self.db, self.in_flight = base, db, in_flight
        self.files = real_xrays(60)
        self.uploaded, self.errors = 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            if len(pending(self.db)) >= self.in_flight:
                continue
            picked = random.sample(self.files, random.choice((1, 2)))
            try:
                r = self.session.post(f"{self.base}/api/v1/studies", timeout=60,
                                      files=[("files", (p.name, p.read_bytes())) for p in picked])
                if r.status_code == 202:
                    self.uploaded += 1
                else:
                    self.errors.append(r.status_code)
            except requests.RequestException as exc:
                self.errors.append(type(exc).__name__)


def pending(db: sa.Engine, status: tuple[str, ...] = ("queued", "running")) -> set[str]:
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT id FROM studies WHERE status IN :s")
                            .bindparams(sa.bindparam("s", expanding=True)), {"s": list(status)})
        return {r[0] for r in rows}


@dataclass
class Kill:
    what: str
    at: float  # time.time()
    running: set[str]
    pending: set[str]


def as_epoch(value: str | datetime | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--redis-restart", action="store_true")
    parser.add_argument("--in-flight", type=int, default=6)
    parser.add_argument("--bound-s", type=float, default=90)
    parser.add_argument("--max-minutes", type=float, default=30)
    parser.add_argument("--max-attempts", type=int, default=25,
                        help="TASK_MAX_ATTEMPTS: a study can be on the worker at several kills")
    args = parser.parse_args()
    hard_stop = time.monotonic() + args.max_minutes * 60
    make_model(MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(PORT=str(port), MODEL_DIR=str(MODEL), DATABASE_URL=f"sqlite:///{tmp / 'chaos.db'}",
               SECRET_KEY="chaos-bench", TF_CPP_MIN_LOG_LEVEL="2",
               TASK_MAX_ATTEMPTS=str(args.max_attempts))
    log_path = tmp / "run.log"
    launcher = subprocess.Popen([str(BIN / "python"), "scripts/run_local.py"], cwd=ROOT, env=env,
                                stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    db = sa.create_engine(env["DATABASE_URL"])
    health = load = None
    kills: list[Kill] = []
    started = time.time()
    try:
        while b"is running at" not in log_path.read_bytes():
            if launcher.poll() is not None or time.monotonic() > hard_stop:
                raise SystemExit(log_path.read_text()[-3000:])
            time.sleep(0.5)
        flask = [str(BIN / "flask"), "--app", "webapp:create_app"]
        subprocess.run([*flask, "users", "create", "--admin", "chaos@example.org",
                        "--generate-password"], cwd=ROOT, env=env, check=True, capture_output=True)
        token = subprocess.run([*flask, "tokens", "create", "chaos@example.org", "--name", "chaos"],
                               cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        health = Health(base)
        health.start()
        load = Load(base, token.stdout.strip().splitlines()[-1], db, args.in_flight)
        load.start()
        started = time.time()
        redis_at = args.kills // 2 if args.redis_restart else -1
        # Each kill after a random uptime (short ones make the launcher's delay grow), mid-study.
        uptime = random.uniform(3, 40)
        killed: set[int] = set()
        while len([k for k in kills if k.what == "worker"]) < args.kills:
            if time.monotonic() > hard_stop - args.bound_s - 60:
                print("out of time for more kills", flush=True)
                break
            if len(kills) == redis_at:
                proc = service_pid(launcher, "redis")
                if proc:
                    kills.append(Kill("redis", time.time(), pending(db, ("running",)), pending(db)))
                    proc.kill()
                    time.sleep(random.uniform(5, 15))
                    continue
            proc = service_pid(launcher, "worker")
            if proc is None or proc.pid in killed or time.time() - proc.create_time() < uptime:
                time.sleep(0.2)
                continue
            running = pending(db, ("running",))
            if not running:
                time.sleep(0.05)
                continue
            kills.append(Kill("worker", time.time(), running, pending(db)))
            proc.kill()
            killed.add(proc.pid)
            print(f"kill {sum(k.what == 'worker' for k in kills)}: worker pid {proc.pid} up "
                  f"{uptime:.0f} s, {len(running)} running", flush=True)
            uptime = random.uniform(3, 40)
        load.stop.set()
        load.join(70)
        drain_until = min(hard_stop, time.monotonic() + args.bound_s + 60)
        while pending(db) and time.monotonic() < drain_until:
            time.sleep(0.5)
        health.stop.set()
        health.join(35)
    finally:
        for thread in (load, health):
            if thread is not None:
                thread.stop.set()
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            launcher.kill()
    return report(args, db, kills, health, load, log_path.read_text(errors="replace"),
                  time.time() - started)


def report(args: argparse.Namespace, db: sa.Engine, kills: list[Kill], health: Health,
           load: Load, log: str, elapsed: float) -> int:
    """Print the figures; 0 when every criterion held."""
    with db.connect() as conn:
        studies = {r.id: r for r in conn.execute(sa.text(
            "SELECT id, status, attempts, created_at, finished_at, error_code FROM studies"))}
        per_image = [n for (n,) in conn.execute(sa.text(
            "SELECT COUNT(p.id) FROM images i LEFT JOIN predictions p ON p.image_id = i.id "
            "GROUP BY i.id"))]
    finished = {i: as_epoch(s.finished_at) for i, s in studies.items()}
    lost = [i for i, s in studies.items() if s.status != "succeeded"]
    duplicated = sum(n > 1 for n in per_image)
    missing = sum(n == 0 for n in per_image)

    def after(kill: Kill, ids: set[str]) -> float:
        ends = [finished[i] - kill.at if finished.get(i) else float("inf") for i in ids]
        return max(ends, default=0.0)

    worker_kills = [k for k in kills if k.what == "worker"]
    running_after = [after(k, k.running) for k in worker_kills]
    pending_after = [after(k, k.pending) for k in kills]
    e2e = [finished[i] - as_epoch(s.created_at) for i, s in studies.items() if finished.get(i)]
    attempts = [s.attempts for s in studies.values()]
    restarts = len(re.findall(r"^worker restarted", log, re.M))
    ok = (len(worker_kills) >= args.kills and not lost and not duplicated and not missing
          and max(pending_after, default=0) <= args.bound_s and not health.failures)
    print(f"""
### {datetime.now(UTC):%Y-%m-%d} chaos: {len(worker_kills)} worker SIGKILLs{', 1 Redis SIGKILL' if any(k.what == 'redis' for k in kills) else ''} under load, `make run` launcher, SQLite

| figure | value |
|---|---|
| run | {elapsed:.0f} s; {load.uploaded} studies uploaded ({len(load.errors)} upload errors: {sorted(set(map(str, load.errors)))}), {len(per_image)} images, {args.in_flight} pending at a time |
| worker SIGKILLs / launcher restarts seen | {len(worker_kills)} / {restarts} |
| studies on the worker at a kill | {sum(len(k.running) for k in worker_kills)} (max {max((len(k.running) for k in worker_kills), default=0)} per kill) |
| kill -> last of its running studies finished | max {max(running_after, default=0):.1f} s, p50 {percentile(running_after, 50) if running_after else 0:.1f} s |
| kill -> last study pending at the kill finished (bound {args.bound_s:.0f} s) | max {max(pending_after, default=0):.1f} s, p50 {percentile(pending_after, 50) if pending_after else 0:.1f} s |
| lost (not succeeded) | {len(lost)} {[(studies[i].status, studies[i].error_code) for i in lost][:5]} |
| images with 2+ results / with none | {duplicated} / {missing} |
| attempts per study | max {max(attempts, default=0)}, studies with 2+: {sum(a > 1 for a in attempts)} |
| upload to result, all studies | p50 {percentile(e2e, 50) if e2e else 0:.1f} s, p95 {percentile(e2e, 95) if e2e else 0:.1f} s, max {max(e2e, default=0):.1f} s |
| /healthz | {health.polls} polls, {len(health.failures)} failed, slowest {health.slowest:.2f} s |
| verdict | {'PASS' if ok else 'FAIL'} |
""", flush=True)
    for kill in kills:
        if kill.what == "redis":
            print(f"redis SIGKILL: {len(kill.pending)} pending, last finished "
                  f"{after(kill, kill.pending):.1f} s later", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
