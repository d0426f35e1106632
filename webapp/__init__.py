"""Flask front end: create_app() wires config -> extensions -> blueprints -> celery."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from webapp.config import INSTANCE_DIR, PROJECT_ROOT, Settings


def _configure_logging(level: str) -> None:
    # key=value lines; handlers already set by gunicorn/celery are left alone.
    logging.basicConfig(
        level=level,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the web app; ``config`` overrides the environment (tests use it)."""
    app = Flask(__name__, instance_path=str(INSTANCE_DIR), instance_relative_config=False)
    app.config.update(Settings.from_env().to_flask())
    if config:
        config = dict(config)
        celery_overrides = config.pop("CELERY", None)
        app.config.update(config)
        if celery_overrides:
            app.config["CELERY"] = {**app.config["CELERY"], **celery_overrides}
    _configure_logging(app.config["LOG_LEVEL"])

    from webapp.extensions import csrf, db, migrate

    db.init_app(app)
    migrate.init_app(app, db, directory=str(PROJECT_ROOT / "migrations"), render_as_batch=True)
    from webapp.security import init_security

    # Before CSRF: rate limits and the sign-in gate come first, whatever the form holds.
    init_security(app)
    csrf.init_app(app)

    from webapp import models  # noqa: F401  (register tables with the metadata)
    from webapp.about.routes import bp as about_bp
    from webapp.admin import bp as admin_bp
    from webapp.api.routes import bp as api_bp
    from webapp.auth.routes import bp as auth_bp
    from webapp.cli import register_cli
    from webapp.clinician.routes import bp as clinician_bp
    from webapp.errors import register_error_handlers
    from webapp.health.routes import bp as health_bp
    from webapp.media.routes import bp as media_bp
    from webapp.metrics import bp as metrics_bp
    from webapp.pacs import models as pacs_models  # noqa: F401  (the PACS round trip's tables)
    from webapp.pacs.stow import bp as dicomweb_bp
    for blueprint in (
        auth_bp, clinician_bp, api_bp, media_bp, health_bp, admin_bp, metrics_bp, about_bp,
        dicomweb_bp,
    ):
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    register_cli(app)

    from webapp.celery_init import celery_init_app

    celery_init_app(app)
    return app

