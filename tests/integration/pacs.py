"""The hospital's side for the PACS tests: Orthanc (Debian's) as the PACS, the listener process, storescu.

Orthanc runs as a plain process on free ports with a throwaway JSON configuration and
its DICOMweb plugin; .ci/run installs `orthanc`, `orthanc-dicomweb` and `dcmtk` if missing.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests

from tests.conftest import REPO
from tests.integration.conftest import BIN, _free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STORESCU = shutil.which("storescu") or "/usr/bin/storescu"
PACS_AE = "ORTHANC"
MODALITY_AE = "MODALITY"
LISTENER_AE = "COVIDCXR"


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class Orthanc:
    """An Orthanc PACS in a temporary directory; start() and stop() keep its storage."""

    workdir: Path
    http_port: int = field(default_factory=_free_port)
    dicom_port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> str:
        """PACS_DESTINATION for C-STORE to this Orthanc."""
        return f"dicom://{PACS_AE}@127.0.0.1:{self.dicom_port}"

    def start(self) -> Orthanc:
        assert Path(ORTHANC).exists() and DICOMWEB_PLUGIN.exists(), (
            "Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb "
            "(.ci/run does it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": PACS_AE, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (self.workdir / "orthanc.json").write_text(json.dumps(config))
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen([ORTHANC, str(self.workdir / "orthanc.json")],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    wait_for_port(self.dicom_port)
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start:\n" + (self.workdir / "orthanc.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def instances(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every instance Orthanc holds of a study, as datasets (queried over its REST API)."""
        found = requests.post(f"{self.url}/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}, timeout=10)
        found.raise_for_status()
        return [pydicom.dcmread(io.BytesIO(
            requests.get(f"{self.url}/instances/{oid}/file", timeout=10).content))
            for oid in found.json()]

    def wait_for(self, study_uid: str, count: int, timeout: float = 120.0,
                 poll_s: float = 0.02) -> tuple[list[pydicom.Dataset], float]:
        """Until the study holds `count` instances: the datasets and when the count was reached."""
        deadline = time.monotonic() + timeout
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        while time.monotonic() < deadline:
            ids = requests.post(f"{self.url}/tools/find", json=query, timeout=10).json()
            if len(ids) >= count:
                return self.instances(study_uid), time.monotonic()
            time.sleep(poll_s)
        raise AssertionError(f"Orthanc holds {len(ids)} of {count} instances after {timeout}s")


def start_listener(env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    """`python -m webapp.pacs.listener`, as deployed, on env's DICOM_PORT."""
    log = open(log_dir / "listener.log", "ab")
    proc = subprocess.Popen([str(BIN / "python"), "-m", "webapp.pacs.listener"], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(int(env["DICOM_PORT"]), timeout=60)
    except AssertionError:
        proc.kill()
        raise AssertionError("listener did not start:\n" + (log_dir / "listener.log").read_text()) from None
    return proc


def storescu(port: int, *paths: Path) -> subprocess.CompletedProcess:
    """DCMTK's storescu sending files to the listener, as a modality or PACS would."""
    return subprocess.run([STORESCU, "-aet", MODALITY_AE, "-aec", LISTENER_AE, "127.0.0.1",
                           str(port), *map(str, paths)], capture_output=True, text=True, timeout=120)
