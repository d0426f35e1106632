"""Flask-WTF forms (CSRF-protected)."""

from flask_wtf import FlaskForm
from wtforms import MultipleFileField, RadioField, SelectChoice, StringField
from wtforms.validators import DataRequired, Length, Optional

PCR_RESULTS = ("positive", "negative", "unknown")
IMPRESSIONS = ("covid", "non-covid", "unsure")


class UploadForm(FlaskForm):
    """One study: one or more X-ray files and optional references."""

    files = MultipleFileField("Chest X-ray images (PNG, JPEG or DICOM)")
    patient_ref = StringField(
        "Patient reference (optional, pseudonymous)", validators=[Optional(), Length(max=64)]
    )
    accession = StringField("Accession number (optional)", validators=[Optional(), Length(max=64)])


class OutcomeForm(FlaskForm):
    """The confirmed RT-PCR outcome of a study: the ground truth the dashboard grades against."""

    pcr_result = RadioField(
        "RT-PCR result",
        choices=[SelectChoice("positive", "Positive"), SelectChoice("negative", "Negative"),
                 SelectChoice("unknown", "Unknown / not done")],
        validators=[DataRequired(message="choose positive, negative or unknown")],
    )


class ImpressionForm(FlaskForm):
    """Read-first: the clinician's own reading, recorded before the AI result is shown."""

    impression = RadioField(
        "Your reading of these images",
        choices=[SelectChoice("covid", "COVID-19 likely"), SelectChoice("non-covid", "COVID-19 not likely"),
                 SelectChoice("unsure", "Unsure")],
        validators=[DataRequired(message="choose one reading")],
    )
