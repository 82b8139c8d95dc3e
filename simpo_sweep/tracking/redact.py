"""Keep secrets out of everything the project writes: params, tags, artifacts and logs.

Two nets: values of keys that name a secret (token, password, ...), and any occurrence of a
secret-named environment variable's value or of a URI's password inside any other string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
# A whole word of the key: HF_TOKEN, db_password, AWS_SECRET_ACCESS_KEY; not tokenizer or *_tokens.
SECRET_KEY = re.compile(
    r"(?:^|[_.\-])(token|passw(?:or)?d|secret|api[_-]?key|credentials?|private[_-]?key)(?:$|[_.\-])",
    re.I,
)
# user:password@host in URIs (database, HTTP basic auth)
URI_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@", re.I
)
# ?token=... and the like in URLs (signed URLs, hub links with access tokens)
QUERY_SECRET = re.compile(
    r"(?P<name>[?&][\w.-]*(?:token|key|sig|signature|password|secret|credential)=)[^&\s#]+",
    re.I,
)
# Values too short to be secrets would redact ordinary words.
MIN_SECRET_LENGTH = 6


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    environ = os.environ if environ is None else environ
    values = {
        value
        for key, value in environ.items()
        if is_secret_key(key) and len(value) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    text = URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = QUERY_SECRET.sub(lambda m: f"{m['name']}{REDACTED}", text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, secrets: list[str] | None = None, key: str = "") -> Any:
    """A copy of `value` (nested dicts/lists/strings) with secrets replaced."""
    secrets = secret_values() if secrets is None else secrets
    if key and is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item, secrets) for item in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value
