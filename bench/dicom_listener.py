"""The DICOM listener: images/s received and queued against the worker tier's, and the time from
the last image received to the structured report stored in the PACS (Orthanc) at light load.

    python bench/dicom_listener.py --model-dir models/current -n 300 --associations 4

Phase 1 sends n DICOM chest X-rays (made from the shared PNGs, one study each) over parallel
associations to `python -m webapp.pacs.listener` with no worker running: images/s received
(C-STORE answered) and queued (studies committed and enqueued). Phase 2 starts one worker
(threads x4, as deployed) and times how fast it drains those studies: the worker tier's
images/s on the same machine and images. Phase 3 points PACS_DESTINATION at an Orthanc and
sends one study at a time: last image received -> SR stored in Orthanc, less the settle time,
against the worker's own time for the study (decode, preprocessing, model, heatmap).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from PIL import Image as PILImage
from pynetdicom import AE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.stack import BIN, BenchStack, percentile, real_xrays  # noqa: E402
from scripts.run_local import free_port, wait_for_port  # noqa: E402
from tests.dicom_objects import DX_FOR_PRESENTATION, cxr_dataset, new_study  # noqa: E402
from tests.integration.pacs import Orthanc  # noqa: E402
from webapp.pacs.transport import store  # noqa: E402

CALLING_AE = "BENCH"


def start_listener(stack: BenchStack, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([str(BIN / "python"), "-m", "webapp.pacs.listener"], cwd=ROOT,
                            env={**stack.env, **env}, stdout=stack.log, stderr=subprocess.STDOUT)
    assert wait_for_port(int(env["DICOM_PORT"]), 60), "listener did not start"
    return proc


def count_studies(database_url: str, finished: bool = False) -> int:
    engine = sa.create_engine(database_url)
    sql = "SELECT COUNT(*) FROM studies" + (" WHERE status = 'succeeded'" if finished else "")
    with engine.connect() as conn:
        n = conn.execute(sa.text(sql)).scalar_one()
    engine.dispose()
    return int(n)


def count_sent(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT COUNT(*) FROM pacs_sends WHERE status = 'sent'")).scalar_one()
    engine.dispose()
    return int(n)


def send_all(port: int, datasets: list, associations: int) -> list[float]:
    """C-STORE every dataset over `associations` parallel associations; per-object seconds."""
    latencies: list[float] = []
    errors: list[str] = []

    def sender(chunk: list) -> None:
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(DX_FOR_PRESENTATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDCXR")
        for ds in chunk:
            t = time.perf_counter()
            status = store(assoc, ds)
            latencies.append(time.perf_counter() - t)
            if int(status.Status) != 0:
                errors.append(f"0x{int(status.Status):04X}")
        assoc.release()

    threads = [threading.Thread(target=sender, args=(datasets[i::associations],))
               for i in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    return latencies


def radiograph(path: Path, side: int):
    """A DX object of the X-ray, scaled so its longer side is `side` px (0: as it is)."""
    ds = cxr_dataset(path, new_study())
    if side:
        gray = PILImage.fromarray(ds.pixel_array.astype(np.int32))
        scale = side / max(gray.size)
        gray = gray.resize((round(gray.width * scale), round(gray.height * scale)))
        ds.Rows, ds.Columns = gray.height, gray.width
        ds.PixelData = np.asarray(gray, dtype=np.uint16).tobytes()
    return ds


def throughput(stack: BenchStack, port: int, n: int, associations: int, settle_s: float,
               side: int) -> dict:
    files = real_xrays(n)
    datasets = [radiograph(path, side) for path in files]
    mb = sum(len(ds.PixelData) for ds in datasets) / 2**20
    start = time.perf_counter()
    latencies = send_all(port, datasets, associations)
    received = time.perf_counter() - start
    while count_studies(stack.env["DATABASE_URL"]) < n:
        time.sleep(0.02)
    queued = time.perf_counter() - start
    # The worker tier on the same machine and images: one worker (threads x4, as deployed),
    # timed from its first finished study so that its start-up does not count.
    stack.start_workers(1)
    url = stack.env["DATABASE_URL"]
    while (first := count_studies(url, finished=True)) == 0:
        time.sleep(0.05)
    drain_start = time.perf_counter()
    while count_studies(url, finished=True) < n:
        time.sleep(0.05)
    drained = time.perf_counter() - drain_start
    while count_sent(url) < n:  # every result delivered to Orthanc too
        time.sleep(0.05)
    delivered = time.perf_counter() - drain_start
    return {"images": n, "longest side px": max(max(ds.Rows, ds.Columns) for ds in datasets),
            "pixel MiB": round(mb, 1), "associations": associations,
            "received images/s": n / received, "received and queued images/s": n / queued,
            "queued images/s, settle excluded": n / max(queued - settle_s, 1e-9),
            "C-STORE p50 ms": 1000 * statistics.median(latencies),
            "C-STORE p95 ms": 1000 * percentile(latencies, 95),
            "worker tier (1 worker, threads x4) images/s": (n - first) / drained,
            "worker tier, results also delivered to Orthanc, images/s": (n - first) / delivered}


def latency(stack: BenchStack, port: int, orthanc: Orthanc, runs: int, settle_s: float) -> dict:
    engine = sa.create_engine(stack.env["DATABASE_URL"])
    gaps, worker_s = [], []
    for path in real_xrays(runs):
        study = new_study()
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(DX_FOR_PRESENTATION)
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDCXR")
        assert int(store(assoc, cxr_dataset(path, study)).Status) == 0
        last_received = time.monotonic()
        assoc.release()
        _, arrived = orthanc.wait_for(study["StudyInstanceUID"], 2, timeout=120, poll_s=0.01)
        with engine.connect() as conn:
            started, finished = conn.execute(sa.text(
                "SELECT started_at, finished_at FROM studies ORDER BY created_at DESC LIMIT 1")).one()
        started, finished = (datetime.fromisoformat(str(t)) for t in (started, finished))
        gaps.append(arrived - last_received - settle_s)
        worker_s.append((finished - started).total_seconds())
    engine.dispose()
    over = [g - w for g, w in zip(gaps, worker_s, strict=True)]
    return {"runs": runs, "settle s (excluded)": settle_s,
            "last image -> SR in Orthanc, less settle, p50 s": statistics.median(gaps),
            "same, max s": max(gaps),
            "worker's own time for the study (decode, preprocess, model, heatmap) p50 s":
                statistics.median(worker_s),
            "overhead beyond the worker's time p50 s": statistics.median(over),
            "overhead max s": max(over)}


def main() -> None:
    """Run the three phases and print a Markdown table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default="models/current")
    parser.add_argument("-n", type=int, default=300, help="images in the throughput phase")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--latency-runs", type=int, default=10)
    parser.add_argument("--side", type=int, default=0,
                        help="scale the throughput phase's images to this many px (0: as shipped)")
    args = parser.parse_args()
    orthanc = Orthanc(Path(tempfile.mkdtemp(prefix="bench-orthanc-"))).start()
    port = free_port()
    listener_env = {"DICOM_PORT": str(port), "DICOM_ALLOWED_CALLING_AETS": CALLING_AE,
                    "DICOM_OWNER_EMAIL": "bench@example.org", "DICOM_SETTLE_S": str(args.settle),
                    "PACS_DESTINATION": orthanc.destination}
    stack = BenchStack(args.model_dir, env={k: v for k, v in listener_env.items()
                                            if k == "PACS_DESTINATION"})
    listener = start_listener(stack, listener_env)
    try:
        figures = throughput(stack, port, args.n, args.associations, args.settle, args.side)
        figures.update(latency(stack, port, orthanc, args.latency_runs, args.settle))
    finally:
        listener.terminate()
        listener.wait(timeout=60)
        stack.stop()
        orthanc.stop()
    print("| measure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


if __name__ == "__main__":
    main()
