"""Admin pages: accounts (invite, deactivate, unlock, reset password) and the audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import func, select

from webapp import accounts, audit
from webapp.admin.blueprint import bp
from webapp.admin.forms import NewUserForm, UserActionForm
from webapp.extensions import db
from webapp.models import Role, User, as_utc
from webapp.security import admin_required

AUDIT_PER_PAGE = 50


def _users_page(new_password: tuple[str, str] | None = None, status: int = 200) -> Any:
    users = db.session.scalars(select(User).order_by(User.email)).all()
    # After a success the invite form starts empty; after an error it keeps what was typed.
    form = NewUserForm(formdata=None) if new_password or request.method == "GET" else NewUserForm()
    return render_template(
        "admin/users.html", users=users, form=form, action_form=UserActionForm(),
        new_password=new_password,
    ), status


@bp.get("/users")
@admin_required
def users() -> Any:
    """Every account, with its state."""
    return _users_page()


@bp.post("/users")
@admin_required
def create_user() -> Any:
    """Invite a clinician (or admin): the one-time password is shown here once."""
    form = NewUserForm()
    if not form.validate_on_submit():
        flash("Enter an email and a role.", "error")
        return _users_page(status=400)
    password = accounts.generate_password()
    try:
        user = accounts.create_user(form.email.data, password, form.role.data)
    except accounts.AccountError as exc:
        flash(str(exc), "error")
        return _users_page(status=400)
    audit.record("user_created", target_user=user.id, role=user.role)
    return _users_page(new_password=(user.email, password))


@bp.post("/users/<int:user_id>")
@admin_required
def update_user(user_id: int) -> Any:
    """Activate, deactivate, unlock or reset the password of one account."""
    user = db.session.get(User, user_id)
    form = UserActionForm()
    if user is None:
        abort(404, description="no such user")
    if not form.validate_on_submit():
        abort(400, description="unknown action")
    action = form.action.data
    if action in ("deactivate", "make_clinician") and user.id == current_user.id:
        flash("You cannot deactivate or demote yourself; another admin can.", "error")
        return redirect(url_for("admin.users"))
    if action == "reset_password":
        password = accounts.generate_password()
        accounts.set_password(user, password)
        audit.record("password_changed", target_user=user.id, by_admin=True)
        return _users_page(new_password=(user.email, password))
    if action == "unlock":
        accounts.unlock(user)
    elif action in ("make_admin", "make_clinician"):
        accounts.set_role(user, Role.ADMIN if action == "make_admin" else Role.CLINICIAN)
    else:
        accounts.set_active(user, action == "activate")
    audit.record("user_updated", target_user=user.id, change=action)
    flash(f"{user.email}: {action} done.", "info")
    return redirect(url_for("admin.users"))


def _date(name: str) -> datetime | None:
    raw = (request.args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return as_utc(datetime.fromisoformat(raw))
    except ValueError:
        abort(400, description=f"{name} must be a date such as 2026-11-26 or 2026-11-26T14:00")


@bp.get("/audit")
@admin_required
def audit_log() -> Any:
    """The audit log, newest first, filtered by action, account, study and time."""
    filters = {k: (request.args.get(k) or "").strip() for k in ("action", "actor", "study_id")}
    if filters["action"] and filters["action"] not in audit.ACTIONS:
        abort(400, description="unknown action")
    stmt = audit.query(**filters, since=_date("since"), until=_date("until"))
    page = request.args.get("page", "1")
    page = int(page) if page.isdigit() and int(page) > 0 else 1
    total = db.session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    events = db.session.scalars(stmt.limit(AUDIT_PER_PAGE).offset((page - 1) * AUDIT_PER_PAGE)).all()
    args = {k: v for k, v in request.args.items() if k != "page" and v}
    return render_template(
        "admin/audit.html", events=events, total=total, page=page, args=args,
        has_next=page * AUDIT_PER_PAGE < total, actions=audit.ACTIONS, filters=request.args,
        as_utc=as_utc,
    )
