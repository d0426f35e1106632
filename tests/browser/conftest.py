"""Playwright driving Debian's Chromium (/usr/bin/chromium, headless) against a real stack.

Browsers are never downloaded: `.ci/run` installs Debian's chromium when it is
missing. Screenshots go to test-artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.conftest import stack_factory  # noqa: F401  (the real stack, shared)

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "test-artifacts" / "browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium() -> Iterator:
    """One headless Chromium for the session; fails (not skips) when it is not installed."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshots() -> Path:
    """Where screenshots of this run go."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
