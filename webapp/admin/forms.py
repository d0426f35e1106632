"""Flask-WTF forms for the admin pages (CSRF-protected)."""

from flask_wtf import FlaskForm
from wtforms import SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length

from webapp.models import Role

ACTIONS = ("activate", "deactivate", "unlock", "reset_password", "make_admin", "make_clinician")


class NewUserForm(FlaskForm):
    """Invite a colleague: their account is made with a one-time password to hand over."""

    email = StringField("Email", validators=[DataRequired(), Length(max=254)])
    role = SelectField("Role", choices=[SelectChoice(r.value) for r in Role], default=Role.CLINICIAN.value)


class UserActionForm(FlaskForm):
    """One change to one account."""

    action = SelectField(
        choices=[SelectChoice(a) for a in ACTIONS],
        validators=[DataRequired()],
    )


class PacsRetryForm(FlaskForm):
    """Try a failed send to the PACS again (the CSRF token is all it carries)."""
