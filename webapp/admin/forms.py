"""Flask-WTF forms for the admin pages (CSRF-protected)."""

from flask_wtf import FlaskForm
from wtforms import SelectChoice, SelectField, StringField
from wtforms.validators import DataRequired, Length

from webapp.models import Role


class NewUserForm(FlaskForm):
    """Invite a colleague: their account is made with a one-time password to hand over."""

    email = StringField("Email", validators=[DataRequired(), Length(max=254)])
    role = SelectField("Role", choices=[SelectChoice(r.value) for r in Role], default=Role.CLINICIAN.value)


class UserActionForm(FlaskForm):
    """activate / deactivate / unlock / reset_password for one user."""

    action = SelectField(
        choices=[SelectChoice(a) for a in ("activate", "deactivate", "unlock", "reset_password")],
        validators=[DataRequired()],
    )
