"""Fault injection for tests/integration/test_lost_worker.py, loaded only by the worker under test
(via PYTHONPATH): decoding an image that carries the marker takes SLOW_DECODE_S seconds, so the
test can catch its study RUNNING and kill or freeze the worker. Never on any path a deployment uses."""

import os
import time

import ml.imaging

MARKER = b"SLOW-DECODE"
_decode = ml.imaging.decode_image


def _slow_decode(data, *args, **kwargs):
    if MARKER in data:
        time.sleep(float(os.environ.get("SLOW_DECODE_S", "3600")))
    return _decode(data, *args, **kwargs)


ml.imaging.decode_image = _slow_decode
