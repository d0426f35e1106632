"""Errors users can read: JSON under /api and for machine routes, an HTML page elsewhere."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

JSON_PREFIXES = ("/api/", "/dicomweb/", "/healthz", "/readyz", "/metrics")
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    503: "unavailable",
}


def api_error(status: int, code: str, message: str) -> Response:
    """The API's one error shape: {"error": {"code", "message"}}."""
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def _wants_json() -> bool:
    return request.path.startswith(JSON_PREFIXES) or (
        request.accept_mimetypes.best == "application/json"
    )


def _respond(status: int, code: str, message: str) -> Any:
    if _wants_json():
        return api_error(status, code, message)
    return render_template("error.html", status=status, message=message), status


def register_error_handlers(app: Flask) -> None:
    """Route every error through one shape per audience."""

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError) -> Any:
        return _respond(400, "csrf_failed", "the form expired or was not sent from this site; reload and try again")

    @app.errorhandler(429)
    def too_many(exc: HTTPException) -> Any:
        response = _respond(429, "too_many_requests", "too many attempts; wait a minute and try again")
        response = app.make_response(response)
        retry = getattr(exc, "retry_after", None) or 60
        response.headers.setdefault("Retry-After", str(int(retry)))
        return response

    @app.errorhandler(413)
    def too_large(exc: HTTPException) -> Any:
        limit_mb = app.config["MAX_CONTENT_LENGTH"] // (1024 * 1024)
        return _respond(413, "payload_too_large", f"the upload is larger than {limit_mb} MiB")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        return _respond(status, CODES.get(status, "error"), exc.description or exc.name)

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError) -> Any:
        log.error("event=database_unavailable error=%s", type(exc.orig).__name__)
        from webapp.extensions import db

        db.session.rollback()
        return _respond(503, "database_unavailable", "the database is unavailable; try again shortly")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        log.exception("event=unhandled_error path=%s", request.path)
        return _respond(500, "internal_error", "something went wrong on our side; it has been logged")
