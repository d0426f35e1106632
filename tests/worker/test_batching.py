"""Cross-job batching and suspect isolation, on a real (tiny) predictor and real threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ml.predictor import Predictor
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
