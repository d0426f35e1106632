"""Cross-job batching and suspect isolation, on a real (tiny) predictor and real threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ml.backends import usable_cpus
from ml.imaging import decode_image
from ml.predictor import Predictor
from tests.conftest import fixture_bytes
from worker.batching import Batcher
from worker.isolation import Isolation


@pytest.fixture(scope="module")
def predictor(tiny_model_dir) -> Predictor:
    return Predictor.load(tiny_model_dir, backend="keras")


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((48, 40)).astype(np.float32)


def test_concurrent_studies_share_one_batch_with_the_same_results(predictor):
    batcher = Batcher(predictor, max_size=16, max_wait_ms=2000)
    images = [[_image(i), _image(i + 10)] for i in range(3)]
    expected = [predictor.predict(pair) for pair in images]
    tickets = [batcher.announce() for _ in images]  # three studies being decoded
    results: dict[int, list] = {}

    def study(i: int) -> None:
        time.sleep(0.05 * i)  # decoding takes a while, unevenly
        batch = predictor.preprocess(images[i])
        results[i] = tickets[i].submit(batch, images[i], explain=False, timeout=30)

    threads = [threading.Thread(target=study, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert batcher.batches_run == 1 and batcher.images_run == 6
    for i in range(3):
        got = [r.probability_covid for r in results[i]]
        assert got == pytest.approx([r.probability_covid for r in expected[i]], abs=1e-5)


def test_a_lone_study_is_not_delayed(predictor):
    batcher = Batcher(predictor, max_size=16, max_wait_ms=5000)
    images = [_image(1)]
    with batcher.announce() as ticket:
        start = time.perf_counter()
        ticket.submit(predictor.preprocess(images), images, explain=False, timeout=30)
    assert time.perf_counter() - start < 2.0  # nowhere near the 5 s max wait


def test_cancelled_studies_do_not_hold_a_batch_back(predictor):
    batcher = Batcher(predictor, max_size=16, max_wait_ms=5000)
    waiting = batcher.announce()
    other = batcher.announce()
    images = [_image(2)]

    def give_up() -> None:
        time.sleep(0.1)
        other.cancel()  # e.g. its image was unreadable

    threading.Thread(target=give_up).start()
    start = time.perf_counter()
    waiting.submit(predictor.preprocess(images), images, explain=False, timeout=30)
    assert time.perf_counter() - start < 2.0


def test_batches_respect_the_maximum_size(predictor):
    batcher = Batcher(predictor, max_size=2, max_wait_ms=500)
    tickets = [batcher.announce() for _ in range(3)]
    images = [[_image(i)] for i in range(3)]
    threads = [threading.Thread(target=tickets[i].submit,
                                args=(predictor.preprocess(images[i]), images[i], False, 30))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert batcher.images_run == 3 and batcher.batches_run == 2


def test_model_errors_reach_every_waiting_study(predictor):
    batcher = Batcher(predictor, max_size=4, max_wait_ms=10)
    bad = np.zeros((1, 7, 7, 3), np.float32)  # wrong input size for the model
    # tf.function refuses an input that does not match its signature.
    with batcher.announce() as ticket, pytest.raises(TypeError, match="tf.function"):
        ticket.submit(bad, [_image(3)], explain=False, timeout=30)


def test_suspects_run_alone():
    isolation = Isolation()
    log: list[str] = []
    ordinary_started = threading.Event()

    def ordinary() -> None:
        with isolation.hold(exclusive=False):
            log.append("ordinary-start")
            ordinary_started.set()
            time.sleep(0.2)
            log.append("ordinary-end")

    def suspect() -> None:
        ordinary_started.wait(5)
        with isolation.hold(exclusive=True):
            log.append("suspect")

    def late() -> None:
        time.sleep(0.1)  # arrives while the suspect waits: must not overtake it
        with isolation.hold(exclusive=False):
            log.append("late")

    threads = [threading.Thread(target=f) for f in (ordinary, suspect, late)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert log == ["ordinary-start", "ordinary-end", "suspect", "late"]


class _Recording:
    """The real engine, each run held open a little and watched: how many ran at once, from where."""

    def __init__(self, engine, hold_s: float = 0.3) -> None:
        self.engine, self.hold_s = engine, hold_s
        self.name = engine.name
        self.running = self.most = 0
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def forward(self, batch, explain):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(self.hold_s)
            return self.engine.forward(batch, explain)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_run_that_many_batches_at_once_and_finish_in_the_studies_threads(
        tiny_onnx_model_dir, lanes):
    onnx = Predictor.load(tiny_onnx_model_dir, backend="onnx", lanes=lanes)
    assert onnx.lanes == lanes
    threads = onnx.backend.session.get_session_options().intra_op_num_threads
    assert threads == (0 if lanes == 1 else max(1, usable_cpus() // lanes))  # 0: ONNX Runtime's own
    engine = _Recording(onnx.backend)
    onnx.backend = engine
    finished_in: list[str] = []
    real_finish = onnx.finish
    onnx.finish = lambda *a, **k: finished_in.append(threading.current_thread().name) or real_finish(*a, **k)
    batcher = Batcher(onnx, max_size=1, max_wait_ms=0)
    xray = decode_image(fixture_bytes("cxnet__681.png")).pixels  # a frontal X-ray: the gate answers it
    images = [[xray[i:]] for i in range(4)]
    results: dict[int, list] = {}

    def study(i: int) -> None:
        with batcher.announce() as ticket:
            results[i] = ticket.submit(onnx.preprocess(images[i]), images[i], explain=True, timeout=30)

    workers = [threading.Thread(target=study, args=(i,), name=f"study-{i}") for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    assert engine.most == lanes and batcher.batches_run == 4
    assert engine.threads <= {f"batcher-{lane}" for lane in range(lanes)}
    # The gate, labels and CAMs are made in each study's own thread, never in a lane.
    assert sorted(finished_in) == [f"study-{i}" for i in range(4)]
    for i in range(4):
        [r] = results[i]
        assert r.abstain_reason is None and r.cam is not None and r.cam.ndim == 2 and r.cam.max() <= 1.0 and r.heatmap_png is None


def test_keras_keeps_one_lane(predictor, tiny_model_dir):
    assert Predictor.load(tiny_model_dir, backend="keras", lanes=4).lanes == 1


def test_inference_lanes_setting() -> None:
    from webapp.config import Settings

    assert Settings.from_env({"SECRET_KEY": "k"}).to_flask()["INFERENCE_LANES"] == 0  # one per CPU
    assert Settings.from_env({"SECRET_KEY": "k", "INFERENCE_LANES": "2"}).to_flask()["INFERENCE_LANES"] == 2
    for bad in ("-1", "two"):
        with pytest.raises(ValueError, match="INFERENCE_LANES"):
            Settings.from_env({"SECRET_KEY": "k", "INFERENCE_LANES": bad})
