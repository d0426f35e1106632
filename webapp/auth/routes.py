"""Sign in (rate limited, with per-account back-off), sign out, the account page and API tokens."""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user, login_user, logout_user
from werkzeug.security import check_password_hash

from webapp import accounts, audit, tokens
from webapp.auth.forms import ButtonForm, LoginForm, PasswordForm, TokenForm
from webapp.extensions import db, limiter
from webapp.security import safe_next

bp = Blueprint("auth", __name__)

# One message for every failure: it must not tell which emails have accounts.
LOGIN_FAILED = (
    "Wrong email or password, or the account is locked for a while after repeated failures."
)


def _login_limit() -> str:
    return current_app.config["LOGIN_RATE_LIMIT"]


def _typed_email(raw: str | None) -> str:
    # Only something shaped like an email goes into the log, never free text.
    try:
        return accounts.normalise_email(raw or "")
    except accounts.AccountError:
        return "(not an email)"


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(_login_limit, methods=["POST"])
def login() -> Any:
    """The sign-in form; on success a new server-side session starts."""
    if current_user.is_authenticated:
        return redirect(url_for("clinician.studies"))
    form = LoginForm(next=request.args.get("next", ""))
    if form.validate_on_submit():
        result = accounts.authenticate(form.email.data, form.password.data)
        if result.user is not None:
            session.clear()  # nothing from before sign-in survives it (no session fixation)
            accounts.start_session(result.user)
            login_user(result.user)
            session.permanent = True  # expires with PERMANENT_SESSION_LIFETIME
            audit.record("login", user=result.user)
            return redirect(safe_next(form.next.data) or url_for("clinician.studies"))
        audit.record("login_failed", actor=_typed_email(form.email.data), reason=result.reason)
        flash(LOGIN_FAILED, "error")
        return render_template("auth/login.html", form=form, first_run=False), 401
    first_run = accounts.user_count() == 0
    return render_template("auth/login.html", form=form, first_run=first_run)


@bp.post("/logout")
def logout() -> Any:
    """Ends the server-side session, so a copied cookie is worthless too."""
    audit.record("logout")
    accounts.end_session(current_user.session_key)
    logout_user()
    session.clear()
    flash("You are signed out.", "info")
    return redirect(url_for("auth.login"))


def _account_page(new_secret: str | None = None, status: int = 200) -> Any:
    return render_template(
        "auth/account.html",
        password_form=PasswordForm(prefix="pw"),
        token_form=TokenForm(prefix="tok"),
        button=ButtonForm(),
        tokens=tokens.tokens_of(current_user),
        token_state=tokens.token_state,
        new_secret=new_secret,
        max_days=current_app.config["API_TOKEN_MAX_DAYS"],
    ), status


@bp.get("/account")
def account() -> Any:
    """Your account: password, API tokens."""
    return _account_page()


@bp.post("/account/read-first")
def toggle_read_first() -> Any:
    """Switch read-first mode: record your own reading before the AI result is shown."""
    if ButtonForm().validate_on_submit():
        current_user.read_first = not current_user.read_first
        db.session.commit()
        state = "on" if current_user.read_first else "off"
        flash(f"Read-first mode is {state}.", "info")
    return redirect(url_for("auth.account"))


@bp.post("/account/password")
def change_password() -> Any:
    """Change your password; every session of yours ends, so you sign in again."""
    form = PasswordForm(prefix="pw")
    if not form.validate_on_submit():
        for errors in form.errors.values():
            for error in errors:
                flash(error, "error")
        return _account_page(status=400)
    if not check_password_hash(current_user.password_hash, form.current.data):
        flash("The current password is wrong.", "error")
        return _account_page(status=400)
    try:
        accounts.set_password(current_user, form.new.data)
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return _account_page(status=400)
    audit.record("password_changed", target_user=current_user.id)
    logout_user()
    session.clear()
    flash("Password changed. Sign in with the new one.", "info")
    return redirect(url_for("auth.login"))


@bp.post("/account/tokens")
def create_token() -> Any:
    """A new API token, shown on this page once."""
    form = TokenForm(prefix="tok")
    if not form.validate_on_submit():
        for errors in form.errors.values():
            for error in errors:
                flash(error, "error")
        return _account_page(status=400)
    try:
        token, secret = tokens.create_token(current_user, form.name.data, form.days.data)
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return _account_page(status=400)
    audit.record("token_created", token_id=token.id, days=form.days.data)
    flash("Copy the token now: it is not shown again.", "info")
    return _account_page(new_secret=secret)


@bp.post("/account/tokens/<int:token_id>/revoke")
def revoke_token(token_id: int) -> Any:
    """Revoke one of your tokens; it stops working at once."""
    if not ButtonForm().validate_on_submit():
        return redirect(url_for("auth.account"))
    try:
        tokens.revoke_token(token_id, owner=current_user)
    except accounts.AccountError:
        abort(404, description="no such token")
    audit.record("token_revoked", token_id=token_id)
    flash("Token revoked.", "info")
    return redirect(url_for("auth.account"))
