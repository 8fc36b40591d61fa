"""Request ids: the one place that names the metadata key, mints ids and vets a caller's id.

Every call carries an ``x-request-id``: the caller's (a client's ``request_id=``, the UI's id of
one generation) or a new one. The servers put it on every log line of the call and echo it in
their answers' metadata, so one action can be followed through both services.
"""

from __future__ import annotations

import uuid

#: The gRPC metadata key of the request id.
REQUEST_ID_KEY = "x-request-id"
#: Longest caller-provided id kept (it ends up in logs).
MAX_REQUEST_ID_CHARS = 128


def new_request_id() -> str:
    """A fresh random request id (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def clean_request_id(value: str | bytes) -> str | None:
    """The caller's id if it is printable ASCII of sane length, else None."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not text or len(text) > MAX_REQUEST_ID_CHARS or not text.isprintable() or not text.isascii():
        return None
    return text
