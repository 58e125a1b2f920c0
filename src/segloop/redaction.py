"""Passwords and tokens out of URIs before they are written, logged or printed.

`redact("postgresql+psycopg://mlflow:s3cret@db:5432/mlflow")` ->
`"postgresql+psycopg://mlflow:***@db:5432/mlflow"`; query parameters that carry a
secret (password, token, secret, key, ...) are masked too. Works on any text (a URI,
an error message, a JSON dump): every URI inside it is redacted. Nothing else here.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@  (the password is everything up to the last @ of the authority)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)(?P<secret>[^\s/'\"]*)(?=@)")
_QUERY = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|key|sig|signature)=)"
    r"(?P<secret>[^&;#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` and every secret query value masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    return _QUERY.sub(lambda m: m["head"] + MASK, text)
