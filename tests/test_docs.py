"""The operations guide documents every setting the code reads."""

from pathlib import Path

from webapp.config import ENV_VARS

REPO = Path(__file__).resolve().parent.parent


def test_every_environment_variable_is_documented():
    guide = (REPO / "docs" / "operations.md").read_text()
    missing = [name for name in ENV_VARS if f"`{name}`" not in guide]
    assert not missing, f"docs/operations.md does not document: {missing}"
