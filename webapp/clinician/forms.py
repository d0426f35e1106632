"""Flask-WTF forms (CSRF-protected)."""

from flask_wtf import FlaskForm
from wtforms import MultipleFileField, StringField
from wtforms.validators import Length, Optional


class UploadForm(FlaskForm):
    """One study: one or more X-ray files and optional references."""

    files = MultipleFileField("Chest X-ray images (PNG, JPEG or DICOM)")
    patient_ref = StringField(
        "Patient reference (optional, pseudonymous)", validators=[Optional(), Length(max=64)]
    )
    accession = StringField("Accession number (optional)", validators=[Optional(), Length(max=64)])
