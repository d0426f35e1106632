"""Flask-WTF forms for signing in and managing one's own account (CSRF-protected)."""

from flask_wtf import FlaskForm
from wtforms import HiddenField, IntegerField, PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, NumberRange


class LoginForm(FlaskForm):
    """Email and password."""

    email = StringField("Email", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=512)])
    next = HiddenField()


class PasswordForm(FlaskForm):
    """Change one's own password: the current one proves it is really them."""

    current = PasswordField("Current password", validators=[DataRequired()])
    new = PasswordField("New password (at least 12 characters)", validators=[DataRequired(), Length(max=512)])
    confirm = PasswordField(
        "New password again", validators=[DataRequired(), EqualTo("new", message="the two new passwords differ")]
    )


class TokenForm(FlaskForm):
    """A new personal API token."""

    name = StringField("Name (what uses it)", validators=[DataRequired(), Length(max=64)])
    days = IntegerField("Valid for (days)", default=90, validators=[DataRequired(), NumberRange(min=1)])


class ButtonForm(FlaskForm):
    """A bare form: a POST button carrying only the CSRF token (logout, revoke, toggles)."""
