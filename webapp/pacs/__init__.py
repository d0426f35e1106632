"""The hospital's imaging workflow: studies in from the PACS (DICOM listener, STOW-RS), results back.

models      dicom_origins (where a study came from; the original identifiers until sent) and
            pacs_sends (one study's results on their way back)
identity    what to keep of a received object's identifiers, and putting them back
intake      received DICOM objects -> studies, through webapp.uploads' steps
listener    the C-STORE SCP process (`python -m webapp.pacs.listener`)
stow        POST /dicomweb/studies (STOW-RS)
reports     the structured report and the heatmap secondary captures (pydicom only)
transport   C-STORE and STOW-RS clients
sends       the only code that changes a pacs_sends row
"""

from __future__ import annotations

import traceback
from pathlib import Path


def where(exc: BaseException) -> str:
    """file:line where an exception was raised, for logs that must not quote its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
