"""What a worker process sets up before its first task (worker/celery_app.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

# In a fresh interpreter: the process-wide switch interval must not leak into the test run.
PROBE = r"""
import json, sys
from types import SimpleNamespace
import worker.celery_app as app
loaded = []
app._preload = lambda: loaded.append(True)  # the model itself is not the point here
default = sys.getswitchinterval()
prefork = SimpleNamespace(pool_cls=type("TaskPool", (), {"__module__": "celery.concurrency.prefork"}))
app._in_main_process(sender=prefork)
parent = sys.getswitchinterval()
threads = SimpleNamespace(pool_cls=type("TaskPool", (), {"__module__": "celery.concurrency.thread"}))
app._in_main_process(sender=threads)
print(json.dumps({"default": default, "prefork_parent": parent, "threads": sys.getswitchinterval(),
                  "loaded": len(loaded), "constant": app.SWITCH_INTERVAL_S}))
"""


def test_a_process_that_runs_tasks_shortens_the_switch_interval_and_a_prefork_parent_does_not():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["default"] == 0.005  # Python's own, so the assertions below say something
    assert seen["prefork_parent"] == 0.005  # runs no task: its children set their own
    assert seen["threads"] == seen["constant"] < seen["default"]
    assert seen["loaded"] == 1  # the model was loaded once, in the process that runs tasks
