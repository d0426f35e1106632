"""The listener as deployed: its Compose service and its command (static checks, no Docker)."""

from __future__ import annotations

import yaml

from tests.test_compose import ROOT, argv, env_of, module_file


def test_the_dicom_service_runs_the_listener_once_on_its_published_port():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    dicom = services["dicom"]
    args = argv(dicom["command"])
    assert args[:2] == ["python", "-m"] and module_file(args[2]).name == "listener.py"
    assert "dicom" in dicom.get("profiles", []), "the listener runs only when enabled"
    env = env_of(dicom)
    assert env["DICOM_BIND"] == "0.0.0.0"
    assert dicom["ports"] == [f"{env['DICOM_PORT']}:{env['DICOM_PORT']}"]
    assert dicom.get("deploy", {}).get("replicas", 1) == 1
    assert dicom["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Workers send the results and the web shows where: both see the destination.
    for name in ("web", "worker", "beat", "dicom"):
        assert "PACS_DESTINATION" in env_of(services[name]), name


def test_make_run_starts_the_listener_only_when_enabled():
    from scripts.run_local import dicom_listener_enabled

    assert not dicom_listener_enabled({"SECRET_KEY": "x"})
    assert not dicom_listener_enabled({"SECRET_KEY": "x", "DICOM_LISTENER": "0"})
    assert dicom_listener_enabled({"SECRET_KEY": "x", "DICOM_LISTENER": "1"})
