"""Signing in and out, lockout, rate limits, CSRF, API tokens, headers and the `flask users` CLI."""

from __future__ import annotations

import io
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.accounts import PASSWORD, bearer_client, form_token, login, make_token, session_client
from tests.conftest import ADMIN, CLINICIAN, png_bytes, post_files
from webapp.config import Settings
from webapp.extensions import db
from webapp.models import ApiToken, AuditEvent, LoginSession, User, utcnow

TEMPLATES = Path(__file__).resolve().parents[2] / "webapp" / "templates"


def _user(app, email: str) -> User:
    with app.app_context():
        user = db.session.scalar(select(User).where(User.email == email))
        db.session.expunge(user)
        return user


def test_sign_in_and_sign_out_really_ends_the_session(app, clinician_id):
    browser = app.test_client()
    bad = login(browser, CLINICIAN, "wrong password, long enough")
    assert bad.status_code == 401 and b"Wrong email or password" in bad.data
    good = login(browser, CLINICIAN.upper(), next="/studies?q=x")  # emails are case-insensitive
    assert good.status_code == 302 and good.headers["Location"] == "/studies?q=x"
    assert browser.get("/studies").status_code == 200
    stolen = browser.get_cookie("session").value  # a copy someone kept
    browser.post("/logout", data={"csrf_token": form_token(browser, "/studies")})
    assert browser.get("/studies").status_code == 401
    replay = app.test_client()
    replay.set_cookie("session", stolen)
    assert replay.get("/studies").status_code == 401  # the server-side session is gone
    with app.app_context():
        assert db.session.scalar(select(LoginSession).where(LoginSession.user_id == clinician_id)) is None


def test_next_must_stay_on_this_site(app, clinician_id):
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        response = login(app.test_client(), CLINICIAN, next=target)
        assert response.headers["Location"] == "/studies", target


def test_idle_sessions_expire(app, clinician_id):
    browser = session_client(app, CLINICIAN)
    with app.app_context():
        row = db.session.scalar(select(LoginSession))
        row.last_seen_at = utcnow() - timedelta(minutes=app.config["SESSION_IDLE_MINUTES"] + 1)
        db.session.commit()
    assert browser.get("/studies").status_code == 401


def test_lockout_backs_off_per_account(app, clinician_id):
    app.config.update(LOCKOUT_AFTER_FAILURES=3, LOCKOUT_BASE_S=60)
    browser = app.test_client()
    for _ in range(3):
        assert login(browser, CLINICIAN, "not the password at all").status_code == 401
    user = _user(app, CLINICIAN)
    assert user.failed_logins == 3
    first_lock = user.locked_until
    assert first_lock is not None
    # While locked even the right password is refused, with the same message.
    locked = login(browser, CLINICIAN)
    assert locked.status_code == 401 and b"Wrong email or password" in locked.data
    with app.app_context():
        db.session.get(User, clinician_id).locked_until = utcnow() - timedelta(seconds=1)
        db.session.commit()
    # One more failure after the lock: the lock doubles.
    assert login(browser, CLINICIAN, "still not the password").status_code == 401
    user = _user(app, CLINICIAN)
    seconds = (user.locked_until.replace(tzinfo=None) - utcnow().replace(tzinfo=None)).total_seconds()
    assert 100 < seconds <= 120
    with app.app_context():
        db.session.get(User, clinician_id).locked_until = None
        db.session.commit()
    assert login(browser, CLINICIAN).status_code == 302
    assert _user(app, CLINICIAN).failed_logins == 0
    with app.app_context():
        reasons = [e.detail["reason"] for e in db.session.scalars(
            select(AuditEvent).where(AuditEvent.action == "login_failed").order_by(AuditEvent.id))]
    assert reasons == ["bad_password"] * 3 + ["locked", "bad_password"]


def test_brute_force_login_is_throttled(app, clinician_id):
    app.config["LOGIN_RATE_LIMIT"] = "3 per minute"
    browser = app.test_client()
    for i in range(3):
        assert login(browser, f"guess{i}@example.org", "whatever it is").status_code == 401
    throttled = login(browser, CLINICIAN)  # even the right password waits
    assert throttled.status_code == 429
    assert int(throttled.headers["Retry-After"]) > 0
    assert b"too many attempts" in throttled.data
    api = browser.post("/login", headers={"Accept": "application/json"},
                       data={"csrf_token": form_token(browser, "/login"), "email": CLINICIAN, "password": PASSWORD})
    assert api.status_code == 429 and api.get_json()["error"]["code"] == "too_many_requests"


def test_limits_are_kept_in_the_brokers_redis(tmp_path):
    from webapp import create_app

    broker = "redis://broker.internal:6379/3"
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}", "CELERY": {"broker_url": broker}})
    assert app.config["RATELIMIT_STORAGE_URI"] == broker
    assert Settings.from_env({"SECRET_KEY": "k"}).lockout_after_failures == 5


def test_csrf_is_required_on_every_form_and_cookie_api_writes(app, clinician_id):
    browser = app.test_client()
    missing = browser.post("/login", data={"email": CLINICIAN, "password": PASSWORD})
    assert missing.status_code == 400 and b"form expired" in missing.data
    browser = session_client(app, CLINICIAN)
    for url in ("/logout", "/account/tokens", "/account/read-first", "/studies/new"):
        assert browser.post(url, data={"name": "x"}).status_code == 400, url
    assert browser.get("/studies").status_code == 200  # still signed in: logout needed the token
    # The API takes a browser session for writes only with the CSRF token in a header.
    no_token = post_files(browser, [("a.png", png_bytes())])
    assert no_token.status_code == 400 and no_token.get_json()["error"]["code"] == "csrf_failed"
    token = form_token(browser, "/studies/new")
    with_token = browser.post("/api/v1/studies", headers={"X-CSRFToken": token},
                              data={"files": [(io.BytesIO(png_bytes()), "a.png")]})
    assert with_token.status_code == 202, with_token.get_json()


def test_api_tokens_shown_once_stored_hashed_revocable_and_expiring(app, clinician_id):
    browser = session_client(app, CLINICIAN)
    page = browser.post("/account/tokens", data={
        "csrf_token": form_token(browser, "/account"), "tok-name": "lab script", "tok-days": "30"})
    assert page.status_code == 200
    secret = re.search(rb'id="new-token">(cxr_[^<]+)<', page.data).group(1).decode()
    assert secret.encode() not in browser.get("/account").data  # shown once
    with app.app_context():
        row = db.session.scalar(select(ApiToken))
        assert row.token_hash != secret and secret not in row.token_hash and row.prefix == secret[:10]
        assert (row.expires_at.replace(tzinfo=None) - utcnow().replace(tzinfo=None)).days in (29, 30)
    api = app.test_client()
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.get("/api/v1/studies", headers=headers).status_code == 200
    assert api.get("/api/v1/studies", headers={"Authorization": "Bearer cxr_made-up"}).status_code == 401
    # Revoked in the UI: refused at once.
    browser.post(f"/account/tokens/{row.id}/revoke", data={"csrf_token": form_token(browser, "/account")})
    revoked = api.get("/api/v1/studies", headers=headers)
    assert revoked.status_code == 401 and revoked.get_json()["error"]["code"] == "invalid_token"
    assert revoked.headers["WWW-Authenticate"].startswith("Bearer")
    # Expired: refused.
    expiring = make_token(app, CLINICIAN, days=1)
    with app.app_context():
        db.session.scalar(select(ApiToken).order_by(ApiToken.id.desc())).expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    assert api.get("/api/v1/studies", headers={"Authorization": f"Bearer {expiring}"}).status_code == 401
    # A token id that is not yours is not found.
    assert browser.post("/account/tokens/999/revoke",
                        data={"csrf_token": form_token(browser, "/account")}).status_code == 404
    # A deactivated user's tokens stop working.
    working = bearer_client(app, CLINICIAN)
    assert working.get("/api/v1/studies").status_code == 200
    with app.app_context():
        db.session.get(User, clinician_id).active = False
        db.session.commit()
    assert working.get("/api/v1/studies").status_code == 401


def test_security_headers_and_cookie_flags(app, clinician_id):
    browser = app.test_client()
    response = login(browser, CLINICIAN)
    cookie = response.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = browser.get("/studies")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-store"
    assert browser.get("/healthz").headers["X-Frame-Options"] == "DENY"


def test_templates_have_no_inline_script_or_style():
    for path in TEMPLATES.rglob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), path
        assert "<style" not in text and not re.search(r"\sstyle=", text), path
        assert not re.search(r"\son[a-z]+=", text), path  # no onclick= and friends


def test_first_run_login_page_says_how_to_create_an_admin(anon_client):
    page = anon_client.get("/login").data
    assert b"users create --admin" in page


def test_password_change_ends_every_session(app, clinician_id):
    first, second = session_client(app, CLINICIAN), session_client(app, CLINICIAN)
    new = "a brand new long password"
    response = first.post("/account/password", data={
        "csrf_token": form_token(first, "/account"), "pw-current": PASSWORD, "pw-new": new, "pw-confirm": new})
    assert response.status_code == 302
    assert second.get("/studies").status_code == 401
    assert login(app.test_client(), CLINICIAN, PASSWORD).status_code == 401
    assert login(app.test_client(), CLINICIAN, new).status_code == 302


def test_admin_invites_a_clinician_who_can_then_sign_in(app, admin_client):
    admin = session_client(app, ADMIN)
    page = admin.post("/admin/users", data={
        "csrf_token": form_token(admin, "/admin/users"), "email": "new.doc@example.org", "role": "clinician"})
    assert page.status_code == 200
    password = re.search(rb'id="new-password">([^<]+)<', page.data).group(1).decode()
    assert b'value="new.doc@example.org"' not in page.data  # the invite form starts empty again
    doctor = session_client(app, "new.doc@example.org", password)
    assert doctor.get("/studies").status_code == 200
    assert doctor.get("/admin/").status_code == 403
    user_id = _user(app, "new.doc@example.org").id
    # Promoted, they sign in again and are an admin; an admin cannot demote themself.
    admin.post(f"/admin/users/{user_id}", data={
        "csrf_token": form_token(admin, "/admin/users"), "action": "make_admin"})
    assert doctor.get("/admin/").status_code == 401
    doctor = session_client(app, "new.doc@example.org", password)
    assert doctor.get("/admin/").status_code == 200
    own_id = _user(app, ADMIN).id
    admin.post(f"/admin/users/{own_id}", data={
        "csrf_token": form_token(admin, "/admin/users"), "action": "make_clinician"})
    assert _user(app, ADMIN).role == "admin"
    admin.post(f"/admin/users/{user_id}", data={
        "csrf_token": form_token(admin, "/admin/users"), "action": "deactivate"})
    assert doctor.get("/studies").status_code == 401  # deactivation ends their sessions


@pytest.mark.parametrize("admin", [True, False])
def test_cli_creates_users_with_a_prompted_or_generated_password(app, admin):
    runner = app.test_cli_runner()
    args = ["users", "create", "first@example.org"] + (["--admin"] if admin else [])
    short = runner.invoke(args=args, input="short\nshort\n")
    assert short.exit_code != 0 and "at least 12" in short.output
    made = runner.invoke(args=args, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert made.exit_code == 0, made.output
    assert PASSWORD not in made.output  # a prompted password is never echoed
    assert _user(app, "first@example.org").role == ("admin" if admin else "clinician")
    again = runner.invoke(args=args, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert again.exit_code != 0 and "already exists" in again.output
    generated = runner.invoke(args=["users", "create", "second@example.org", "--generate-password"])
    password = re.search(r"Password \(shown once\): (\S+)", generated.output).group(1)
    assert login(app.test_client(), "second@example.org", password).status_code == 302
    token = runner.invoke(args=["tokens", "create", "second@example.org", "--name", "ci"])
    secret = token.stdout.strip().splitlines()[-1]
    assert app.test_client().get("/api/v1/studies", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    token_id = re.search(r"Token (\d+)", token.output).group(1)
    assert runner.invoke(args=["tokens", "revoke", token_id]).exit_code == 0
    assert app.test_client().get("/api/v1/studies", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    listing = runner.invoke(args=["users", "list"]).output
    assert "first@example.org" in listing and "second@example.org" in listing
