"""The admin blueprint object, on its own so the modules that add views to it need not import each other."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("admin", __name__, url_prefix="/admin")
