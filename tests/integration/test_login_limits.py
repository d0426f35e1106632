"""Sign-in limits on the real web server: counted in Redis, so two gunicorn processes share them."""

from __future__ import annotations

import re

import pytest
import redis
import requests

from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration


def attempt(base: str, email: str) -> int:
    """One sign-in try from a new browser (a new connection, so either gunicorn process may answer)."""
    with requests.Session() as browser:
        page = browser.get(f"{base}/login", timeout=10)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
        return browser.post(f"{base}/login", data={"csrf_token": token, "email": email,
                                                    "password": "not the password, long"},
                            allow_redirects=False, timeout=10).status_code


def test_login_throttle_is_shared_by_the_web_processes(stack_factory, tmp_path, tiny_model_dir):
    store = redis.Redis.from_url(TEST_REDIS_URL)
    stack = stack_factory(
        f"sqlite:///{tmp_path / 'limits.db'}", tiny_model_dir, worker=False,
        # requests keeps Secure cookies to https only; the CSRF cookie must reach the form here.
        extra_env={"SESSION_COOKIE_SECURE": "0", "LOGIN_RATE_LIMIT": "3 per minute"},
    )
    try:
        codes = [attempt(stack.base_url, f"guess{i}@example.org") for i in range(4)]
        assert codes == [401, 401, 401, 429], codes
        assert [k for k in store.scan_iter("LIMITS*") if b"login" in k], "no limit counter in Redis"
    finally:
        for key in store.scan_iter("LIMITS*"):
            if b"login" in key:
                store.delete(key)
