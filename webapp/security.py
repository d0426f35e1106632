"""Who is asking, and may they: sessions and bearer tokens, the deny-by-default gate, headers.

Every endpoint needs a signed-in user except those in PUBLIC_ENDPOINTS. Pages
send anonymous browsers to the login form; everything else gets a 401 in the
API's error shape.
"""

from __future__ import annotations

from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, current_app, g, redirect, request, url_for
from flask_login import current_user
from werkzeug.middleware.proxy_fix import ProxyFix

from webapp import accounts, tokens
from webapp.errors import JSON_PREFIXES, api_error
from webapp.extensions import csrf, limiter, login_manager

PUBLIC_ENDPOINTS = frozenset({"auth.login", "health.healthz", "health.readyz", "static"})
METRICS_ENDPOINT = "metrics.metrics"
# No inline scripts or styles anywhere: the templates use static/ files only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _load_from_session(key: str) -> Any:
    user = accounts.load_session(key)
    if user is not None:
        g.auth_method = "session"
    return user


def _load_from_bearer(req: Any) -> Any:
    header = req.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    user = tokens.user_for_token(secret.strip())
    if user is None:
        g.auth_error = "invalid_token"
        return None
    g.auth_method = "token"
    return user


def wants_login_page() -> bool:
    """A browser navigating to a page (not the API, not an <img>, not a script)."""
    return (
        not request.path.startswith(JSON_PREFIXES)
        and "text/html" in request.headers.get("Accept", "")
        and "Authorization" not in request.headers
    )


def _unauthorized() -> Any:
    if g.get("auth_error") == "invalid_token":
        response = api_error(401, "invalid_token", "the API token is invalid, expired or revoked")
    elif wants_login_page():
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    else:
        response = api_error(
            401, "unauthorized", "sign in, or send a personal API token as 'Authorization: Bearer ...'"
        )
    response.headers["WWW-Authenticate"] = 'Bearer realm="covidcxr"'
    return response


def safe_next(target: str | None) -> str | None:
    """A same-site path to return to after login; anything else is dropped (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


def _require_login() -> Any:
    endpoint = request.endpoint
    if endpoint is None or endpoint in PUBLIC_ENDPOINTS:
        return None  # unknown URLs 404 without telling who may see what
    if endpoint == METRICS_ENDPOINT and current_app.config["METRICS_PUBLIC"]:
        return None
    if not current_user.is_authenticated:
        return login_manager.unauthorized()
    if g.get("auth_method") == "session" and request.method not in SAFE_METHODS:
        # Cookie-authenticated writes need the CSRF token, the API's included.
        csrf.protect()
    return None


def admin_required(view: Any) -> Any:
    """403 unless the signed-in user is an admin (the gate has already checked sign-in)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not current_user.is_authenticated or not current_user.is_admin:
            abort(403, description="this page is for admins")
        return view(*args, **kwargs)

    return wrapped


def _headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if "Cache-Control" not in headers and request.endpoint != "static":
        # Pages and JSON about patients stay out of every cache, the back button's included.
        headers["Cache-Control"] = "no-store"
    return response


def init_security(app: Flask) -> None:
    """Bind Flask-Login, Flask-Limiter, the sign-in gate and the response headers."""
    if app.config["TRUSTED_PROXIES"]:
        n = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    login_manager.init_app(app)
    login_manager.user_loader(_load_from_session)
    login_manager.request_loader(_load_from_bearer)
    login_manager.unauthorized_handler(_unauthorized)
    login_manager.login_view = "auth.login"
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # Limits live in the broker's Redis so every gunicorn process counts together.
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["CELERY"]["broker_url"])
    limiter.init_app(app)
    app.before_request(_require_login)
    app.after_request(_headers)
