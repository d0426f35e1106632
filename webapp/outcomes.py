"""What clinicians record about a study: the RT-PCR outcome (ground truth) and a read-first impression."""

from __future__ import annotations

from webapp import audit
from webapp.clinician.forms import IMPRESSIONS, PCR_RESULTS
from webapp.extensions import db
from webapp.models import Study, User, utcnow


class OutcomeError(ValueError):
    """A value that cannot be recorded; the message is for people."""


def record_outcome(study: Study, result: str, user: User) -> None:
    """Set (or correct) the study's RT-PCR outcome; the change is audited with old and new value."""
    if result not in PCR_RESULTS:
        raise OutcomeError(f"pcr_result must be one of: {', '.join(PCR_RESULTS)}")
    old = study.pcr_result
    study.pcr_result = result
    study.pcr_recorded_at = utcnow()
    study.pcr_recorded_by = user.id
    db.session.commit()
    audit.record("outcome_recorded", user=user, study_id=study.id, old=old, new=result)


def shows_result(study: Study, user: User) -> bool:
    """False while read-first hides the AI result: the owner has not yet recorded their reading."""
    return not (user.read_first and study.owner_id == user.id and study.reader_impression is None)


def record_impression(study: Study, impression: str, user: User) -> None:
    """Record the reader's impression once; it cannot change after the AI result is revealed."""
    if impression not in IMPRESSIONS:
        raise OutcomeError(f"impression must be one of: {', '.join(IMPRESSIONS)}")
    if study.reader_impression is not None:
        raise OutcomeError("an impression is already recorded for this study")
    study.reader_impression = impression
    study.reader_impression_at = utcnow()
    db.session.commit()
    audit.record("impression_recorded", user=user, study_id=study.id, impression=impression)
