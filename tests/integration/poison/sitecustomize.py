"""Fault injection for tests/integration/test_faults.py, loaded only by the worker under test
(via PYTHONPATH): decoding an image that carries the marker kills the process outright, the
way a crashing native decoder would. Never on any path a deployment uses."""

import os
import signal

import ml.imaging

MARKER = b"POISON-PILL"
_decode = ml.imaging.decode_image


def _crashing_decode(data, *args, **kwargs):
    if MARKER in data:
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode(data, *args, **kwargs)


ml.imaging.decode_image = _crashing_decode
