"""The DICOM listener and PACS destination settings, parsed in webapp/config.py."""

from __future__ import annotations

import pytest

from webapp.config import Settings


def settings(**env: str) -> Settings:
    return Settings.from_env({"SECRET_KEY": "x", **env})


def test_defaults_listen_locally_refuse_everyone_and_send_nothing():
    s = settings()
    assert (s.dicom_listener, s.dicom_ae_title, s.dicom_bind, s.dicom_port) == (
        False, "COVIDCXR", "127.0.0.1", 11112)
    assert s.dicom_allowed_calling_aets == () and s.dicom_owner_email == ""
    assert s.dicom_settle_s == 2.0 and s.pacs_destination is None
    flask = s.to_flask()
    assert flask["PACS_DESTINATION"] is None and flask["DICOM_ALLOWED_CALLING_AETS"] == []
    assert "resend-pacs-results" in flask["CELERY"]["beat_schedule"]


def test_listener_settings():
    s = settings(DICOM_LISTENER="1", DICOM_AE_TITLE="TRIAGE", DICOM_PORT="4100",
                 DICOM_ALLOWED_CALLING_AETS="PACS1, MODALITY_2", DICOM_SETTLE_S="0.5",
                 DICOM_OWNER_EMAIL=" pacs@hospital.org ")
    assert s.dicom_listener and s.dicom_ae_title == "TRIAGE" and s.dicom_port == 4100
    assert s.dicom_allowed_calling_aets == ("PACS1", "MODALITY_2")
    assert s.dicom_settle_s == 0.5 and s.dicom_owner_email == "pacs@hospital.org"


@pytest.mark.parametrize("env", [{"DICOM_AE_TITLE": "A" * 17}, {"DICOM_AE_TITLE": "BAD\\AE"},
                                 {"DICOM_ALLOWED_CALLING_AETS": "OK,ÄRZTE"},
                                 {"DICOM_SETTLE_S": "-1"}, {"DICOM_SETTLE_S": "soon"}])
def test_bad_listener_settings_are_refused(env):
    with pytest.raises(ValueError):
        settings(**env)


def test_destinations():
    dimse = settings(PACS_DESTINATION="dicom://ORTHANC@pacs.hospital.org:4242").pacs_destination
    assert dimse == {"kind": "dimse", "ae_title": "ORTHANC", "host": "pacs.hospital.org",
                     "port": 4242, "label": "dicom://ORTHANC@pacs.hospital.org:4242"}
    stow = settings(PACS_DESTINATION="https://pacs.hospital.org/dicom-web/").pacs_destination
    assert stow == {"kind": "stow", "url": "https://pacs.hospital.org/dicom-web",
                    "label": "https://pacs.hospital.org/dicom-web"}


@pytest.mark.parametrize("raw", ["dicom://pacs:4242", "dicom://AE@pacs", "ftp://pacs/",
                                 "https://user:secret@pacs/dicom-web", "pacs:4242"])
def test_bad_destinations_are_refused(raw):
    with pytest.raises(ValueError, match="PACS_DESTINATION"):
        settings(PACS_DESTINATION=raw)
