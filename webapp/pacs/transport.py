"""Deliver DICOM objects to the PACS: C-STORE (pynetdicom) or DICOMweb STOW-RS (urllib)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from webapp.pacs.multipart import encode_related
from webapp.pacs.reports import encode

# pynetdicom narrates every association at INFO; the service logs its own key=value lines.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)
# Success and the Storage warnings (coercion, elements discarded, does not match SOP class).
STORE_OK = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
# STOW-RS response attributes (PS3.18 10.5.3): FailedSOPSequence and FailureReason.
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"


def store(assoc, ds: Dataset, *, settle_s: float = 1.0) -> Dataset:
    """C-STORE one object on an established association and return pynetdicom's status.

    pynetdicom (3.0.4) pauses its reactor thread for each send_c_store and resumes it after.
    If the next send comes before that thread has woken from the last one, it can take the
    new reply off the queue itself ("Received unexpected C-STORE service message"): the
    sender then waits out the DIMSE timeout for a reply it never sees. So wait, briefly and
    with a bound, until the reactor runs again before sending.
    """
    deadline = time.monotonic() + settle_s
    # A private flag (pynetdicom is pinned); a release without it sends at once, as before.
    while (getattr(assoc, "_is_paused", False) and assoc.is_established
           and time.monotonic() < deadline):
        time.sleep(0.0005)
    return assoc.send_c_store(ds)


class SendError(Exception):
    """A send that did not deliver everything: a stable code and a message without patient data."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def send(datasets: Sequence[Dataset], destination: dict[str, Any], *, calling_ae: str,
         timeout: float, authorization: str = "") -> int:
    """Deliver every object to the destination (config PACS_DESTINATION); returns how many."""
    if destination["kind"] == "dimse":
        return c_store(datasets, destination, calling_ae=calling_ae, timeout=timeout)
    return stow_rs(datasets, destination["url"], timeout=timeout, authorization=authorization)


def c_store(datasets: Sequence[Dataset], destination: dict[str, Any], *, calling_ae: str,
            timeout: float) -> int:
    """Send the objects over one association; any failure status fails the whole send."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination["host"], destination["port"], ae_title=destination["ae_title"])
    if not assoc.is_established:
        if assoc.is_rejected:
            raise SendError("association_rejected",
                            f"{destination['label']} rejected the association (check AE titles)")
        raise SendError("unreachable", f"no association with {destination['label']}")
    sent = 0
    try:
        for ds in datasets:
            status = store(assoc, ds)
            if not status:  # no response: timeout, abort or lost connection
                raise SendError("no_response", f"{destination['label']} did not answer a C-STORE")
            code = int(status.Status)
            if code not in STORE_OK:
                raise SendError("store_refused",
                                f"{destination['label']} answered C-STORE with status 0x{code:04X}")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def stow_rs(datasets: Sequence[Dataset], root: str, *, timeout: float, authorization: str = "") -> int:
    """POST the objects to <root>/studies as one multipart/related request."""
    body, content_type = encode_related([encode(ds) for ds in datasets])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(f"{root}/studies", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        raise SendError("stow_refused", f"{root} answered STOW-RS with HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SendError("unreachable", f"{root}: {type(reason).__name__}") from None
    failed = _failed_count(payload)
    if status not in (200, 202) or failed:
        raise SendError("stow_refused",
                        f"{root} answered STOW-RS with HTTP {status}, {failed} object(s) refused")
    return len(datasets)


def _failed_count(payload: bytes) -> int:
    """How many objects a STOW-RS response lists as failed (0 when it lists none or is not JSON)."""
    try:
        body = json.loads(payload or b"{}")
    except ValueError:
        return 0
    if isinstance(body, list):
        body = body[0] if body else {}
    failed = body.get(FAILED_SOP_SEQUENCE, {}) if isinstance(body, dict) else {}
    return len(failed.get("Value") or [])
