"""Secrets never reach a file, a log line or wandb: URL passwords, secret query parameters,
the values of secret-looking environment variables, secret-looking keys. Pure (stdlib only),
the bottom layer: models, data, run, the model card, the sweep report and the sinks use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

_SECRET_KEY = re.compile(r"api[_-]?key|secret|passw(or)?d|credential|auth|private[_-]?key|"
                         r"(^|[_-])token$", re.IGNORECASE)
_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SECRET_MIN_LEN = 8  # shorter values (true, 1, offline) would redact ordinary text
# scheme://user:PASSWORD@host -> scheme://user:***@host (SQLAlchemy, Redis, git, ... URLs)
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):[^\s@'\"]+@")
# ?password=...&token=... in a URL's query string
_QUERY_SECRET = re.compile(r"([?&;](?:password|passwd|pwd|token|secret|api[_-]?key|"
                           r"access[_-]?token|auth)=)[^&;\s'\"]+", re.IGNORECASE)
MASK = "***"


def env_secrets() -> set:
    """Values of environment variables whose names look secret (KEY, TOKEN, SECRET, PASSWORD, ...)."""
    return {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= _SECRET_MIN_LEN}


def redact_text(text: str, secrets: set | None = None) -> str:
    """``text`` with URL passwords, secret query parameters and secret env values masked."""
    if secrets is None:
        secrets = env_secrets()
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", str(text))
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    for secret in sorted(secrets, key=len, reverse=True):  # a longer secret may hold a shorter one
        text = text.replace(secret, MASK)
    return text


def scrub(obj: Any, secrets: set | None = None) -> Any:
    """Drop secret-looking keys and any value equal to a secret-looking env var; in the other
    strings mask URL passwords and secret env values (`redact_text`)."""
    if secrets is None:
        secrets = env_secrets()
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items()
                if not _SECRET_KEY.search(str(k)) and not (isinstance(v, str) and v in secrets)}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj if not (isinstance(v, str) and v in secrets)]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


@contextlib.contextmanager
def redacted_argv():
    """``sys.argv`` with secrets masked while a library records it (wandb's metadata keeps the args)."""
    saved = sys.argv[:]
    secrets = env_secrets()
    sys.argv[1:] = [redact_text(a, secrets) for a in saved[1:]]
    try:
        yield
    finally:
        sys.argv[:] = saved
