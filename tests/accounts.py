"""Test helpers for accounts: make users, sign in a test client, give it an API token."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

PASSWORD = "correct horse battery staple"


def make_user(app: Flask, email: str, role: str = "clinician", password: str = PASSWORD) -> int:
    """Create an account directly (as `flask users create` does); returns its id."""
    from webapp import accounts

    with app.app_context():
        return accounts.create_user(email, password, role).id


def make_token(app: Flask, email: str, name: str = "tests", days: int | None = None) -> str:
    """A new API token for the account; returns the secret."""
    from webapp import accounts, tokens

    with app.app_context():
        return tokens.create_token(accounts.find_user(email), name, days)[1]


def bearer_client(app: Flask, email: str) -> FlaskClient:
    """A test client that sends `Authorization: Bearer <a new token of this account>`."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {make_token(app, email)}"
    return client


def form_token(client: FlaskClient, url: str) -> str:
    """The CSRF token of the form on a page."""
    page = client.get(url)
    assert page.status_code == 200, (url, page.status_code)
    match = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page.data) or re.search(
        rb'name="csrf_token" value="([^"]+)"', page.data
    )
    assert match, f"no CSRF token on {url}"
    return match.group(1).decode()


def login(client: FlaskClient, email: str, password: str = PASSWORD, **extra: Any):
    """Sign in through the real form (CSRF token included); returns the response."""
    return client.post(
        "/login",
        data={"csrf_token": form_token(client, "/login"), "email": email, "password": password, **extra},
    )


def session_client(app: Flask, email: str, password: str = PASSWORD) -> FlaskClient:
    """A test client signed in through the login form, as a browser is."""
    client = app.test_client()
    response = login(client, email, password)
    assert response.status_code == 302, response.data[-500:]
    return client
