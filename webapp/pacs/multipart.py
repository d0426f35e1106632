"""multipart/related bodies (RFC 2387) as DICOMweb STOW-RS uses them: build one, split one."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

DICOM_TYPE = "application/dicom"
_PARAM = re.compile(r';\s*([A-Za-z0-9_.\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class MultipartError(ValueError):
    """A body that is not a usable multipart/related message."""


def content_type_params(header: str) -> tuple[str, dict[str, str]]:
    """The media type (lower case) and its parameters (names lower case, quotes removed)."""
    media_type = header.split(";", 1)[0].strip().lower()
    params = {k.lower(): v[1:-1] if v.startswith('"') else v for k, v in _PARAM.findall(header)}
    return media_type, params


def encode_related(parts: Sequence[bytes], part_type: str = DICOM_TYPE) -> tuple[bytes, str]:
    """A multipart/related body of `parts` and its Content-Type header."""
    boundary = f"covidcxr-{secrets.token_hex(16)}"
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode("ascii"))
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f'multipart/related; type="{part_type}"; boundary={boundary}'


def decode_related(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """Split a multipart/related body into (part Content-Type, part bytes)."""
    media_type, params = content_type_params(content_type)
    boundary = params.get("boundary", "")
    if media_type != "multipart/related" or not boundary:
        raise MultipartError("the body must be multipart/related with a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    sections = body.split(b"\r\n" + delimiter)
    if sections[0].startswith(delimiter):
        sections[0] = sections[0][len(delimiter):]
    else:
        sections = sections[1:]  # a preamble before the first delimiter
    if not sections:
        raise MultipartError("the body holds no part")
    parts: list[tuple[str, bytes]] = []
    for section in sections:
        if section.startswith(b"--"):
            break  # the close delimiter
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a part has no header/body separator")
        part_type = params.get("type", "")
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.strip()
        parts.append((part_type, data))
    else:
        raise MultipartError("the body has no closing boundary")
    return parts
