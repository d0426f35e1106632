"""GET /model (the page) and GET /api/v1/model (JSON): what the served model is and how it did.

The card is the served artifact's MODEL_CARD.md (intended use, data and licences, internal and
cross-source figures with their intervals, limitations). It is rendered with raw HTML turned
off, so the card cannot inject markup; its relative links point into the project's repository
(docs/experiments/), which the service does not serve, so they are shown as text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, render_template, request, url_for
from markupsafe import Markup

from ml.artifact import ArtifactError, ModelMetadata, read_metadata

bp = Blueprint("about", __name__)
CARD_FILE = "MODEL_CARD.md"


def _served() -> tuple[ModelMetadata | None, str | None, str | None]:
    """(metadata, card text, why not) of the artifact in MODEL_DIR."""
    model_dir = Path(current_app.config["MODEL_DIR"])
    try:
        meta = read_metadata(model_dir)
    except ArtifactError as exc:
        return None, None, exc.message
    card = model_dir / CARD_FILE
    if not card.is_file():
        return meta, None, f"this model ({meta.model_version}) ships no {CARD_FILE}"
    return meta, card.read_text(encoding="utf-8"), None


def render_card(text: str) -> Markup:
    """The card as HTML: CommonMark and tables, no raw HTML, repository links as text."""
    from markdown_it import MarkdownIt  # only this page needs it

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def link_open(self, tokens, idx, options, env) -> str:
        href = tokens[idx].attrGet("href") or ""
        if href.startswith(("http://", "https://", "#")):
            return self.renderToken(tokens, idx, options, env)
        tokens[idx].meta["as_text"] = True
        return f'<span class="repo-path" title="{md.utils.escapeHtml(href)}">'

    def link_close(self, tokens, idx, options, env) -> str:
        opened = next(t for t in reversed(tokens[:idx]) if t.type == "link_open")
        if opened.meta.get("as_text"):
            return "</span>"
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("link_open", link_open)
    md.add_render_rule("link_close", link_close)
    return Markup(md.render(text))


def summary(meta: ModelMetadata) -> dict[str, Any]:
    """What the API says about the served model."""
    return {
        "model_version": meta.model_version,
        "model_sha256": meta.weights_sha256,
        "architecture": meta.architecture.get("name"),
        "input_size": meta.input_size,
        "preprocess_version": meta.preprocess_version,
        "threshold": meta.threshold,
        "trained": meta.trained,
        "notice": meta.notice,
        "model_card_url": url_for("about.model_page", _external=False),
    }


@bp.get("/model")
def model_page() -> Any:
    """About this model: its card, or why there is none (?version=V: the result's model)."""
    meta, card, missing = _served()
    html = render_card(card) if card else None
    asked = request.args.get("version", "")[:200]
    other = asked if meta is not None and asked and asked != meta.model_version else None
    variant = _variant(meta, other) if other else None
    return render_template(
        "about/model.html", meta=meta, card=html, missing=missing,
        other_version=None if variant else other, variant=variant,
    )


def _variant(meta: ModelMetadata | None, version: str) -> dict[str, Any] | None:
    """The served artifact's int8 variant, if `version` is the one it serves under (a model of
    its own: `<model_version>+int8`, with its own threshold), else None."""
    from ml.backends import INT8_INFO_FILE, read_onnx_info, serving_terms

    if meta is None or not version.startswith(meta.model_version + "+"):
        return None
    try:
        threshold, served_as = serving_terms(
            meta, read_onnx_info(current_app.config["MODEL_DIR"], meta, INT8_INFO_FILE))
    except ArtifactError:
        return None
    return {"version": served_as, "threshold": threshold} if served_as == version else None


@bp.get("/api/v1/model")
def model_json() -> Any:
    """The served model's identity, threshold and card (markdown) as JSON."""
    meta, card, missing = _served()
    if meta is None:
        return jsonify({"error": {"code": "no_model", "message": missing}}), 503
    return jsonify({**summary(meta), "model_card": card, "model_card_missing": missing})
