"""`flask users ...` and `flask tokens ...`: accounts from the command line (the first admin starts here)."""

from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from webapp import accounts, audit, tokens
from webapp.extensions import db
from webapp.models import Role, User

users_cli = AppGroup("users", help="Create and manage accounts.")
tokens_cli = AppGroup("tokens", help="Create and revoke personal API tokens.")
CLI_ACTOR = "cli"


def _user_or_exit(email: str) -> User:
    user = accounts.find_user(email)
    if user is None:
        raise click.ClickException(f"no account for {email}")
    return user


def _password(generate: bool) -> tuple[str, bool]:
    if generate:
        return accounts.generate_password(), True
    return click.prompt("Password", hide_input=True, confirmation_prompt=True), False


@users_cli.command("create")
@click.argument("email")
@click.option("--admin", is_flag=True, help="Make an admin (default: clinician).")
@click.option("--generate-password", is_flag=True, help="Generate a password and print it once.")
def create_user(email: str, admin: bool, generate_password: bool) -> None:
    """Create an account; the password is prompted for, or generated and printed once."""
    password, generated = _password(generate_password)
    try:
        user = accounts.create_user(email, password, Role.ADMIN if admin else Role.CLINICIAN)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    audit.record("user_created", actor=CLI_ACTOR, target_user=user.id, role=user.role)
    click.echo(f"Created {user.role} {user.email}.")
    if generated:
        click.echo(f"Password (shown once): {password}")


@users_cli.command("list")
def list_users() -> None:
    """Every account with its role and state."""
    for user in db.session.scalars(select(User).order_by(User.email)):
        state = "active" if user.active else "deactivated"
        click.echo(f"{user.id}\t{user.email}\t{user.role}\t{state}")


@users_cli.command("set-password")
@click.argument("email")
@click.option("--generate-password", is_flag=True, help="Generate a password and print it once.")
def set_password(email: str, generate_password: bool) -> None:
    """Replace an account's password and clear its lockout; its sessions end."""
    user = _user_or_exit(email)
    password, generated = _password(generate_password)
    try:
        accounts.set_password(user, password)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    audit.record("password_changed", actor=CLI_ACTOR, target_user=user.id)
    click.echo(f"Password of {user.email} changed.")
    if generated:
        click.echo(f"Password (shown once): {password}")


@users_cli.command("deactivate")
@click.argument("email")
def deactivate(email: str) -> None:
    """Stop an account from signing in or using its tokens."""
    user = _user_or_exit(email)
    accounts.set_active(user, False)
    audit.record("user_updated", actor=CLI_ACTOR, target_user=user.id, change="deactivate")
    click.echo(f"Deactivated {user.email}.")


@users_cli.command("unlock")
@click.argument("email")
def unlock(email: str) -> None:
    """Clear failed sign-in attempts and any lockout."""
    user = _user_or_exit(email)
    accounts.unlock(user)
    audit.record("user_updated", actor=CLI_ACTOR, target_user=user.id, change="unlock")
    click.echo(f"Unlocked {user.email}.")


@tokens_cli.command("create")
@click.argument("email")
@click.option("--name", required=True, help="What will use the token.")
@click.option("--days", type=int, default=None, help="Lifetime in days (default API_TOKEN_MAX_DAYS).")
def create_token(email: str, name: str, days: int | None) -> None:
    """Create an API token for an account; the token alone is printed on stdout, once."""
    user = _user_or_exit(email)
    try:
        token, secret = tokens.create_token(user, name, days)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    audit.record("token_created", user=user, actor=CLI_ACTOR, token_id=token.id)
    click.echo(f"Token {token.id} for {user.email}, expires {token.expires_at:%Y-%m-%d}:", err=True)
    click.echo(secret)


@tokens_cli.command("revoke")
@click.argument("token_id", type=int)
def revoke_token(token_id: int) -> None:
    """Revoke a token by its id (see the account page or the audit log)."""
    try:
        token = tokens.revoke_token(token_id)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from exc
    audit.record("token_revoked", actor=CLI_ACTOR, token_id=token.id)
    click.echo(f"Revoked token {token.id}.")


def register_cli(app: Flask) -> None:
    """Add the command groups to `flask`."""
    app.cli.add_command(users_cli)
    app.cli.add_command(tokens_cli)
