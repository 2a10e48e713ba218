"""Redis URLs: shown without their password, and turned into TLS options for Celery.

A Redis URL may carry a password (``redis://:secret@host:6379/0``); wherever one is logged
or echoed in an error, ``mask_url`` (or ``redact`` for free text) shows ``***`` instead.

``rediss://`` (TLS) works end to end: redis-py reads the TLS options from the URL's query
(``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``), but Celery does
not: its result backend refuses a ``rediss://`` URL without ``ssl_cert_reqs`` and its broker
(kombu) falls back to *not verifying* the certificate. ``celery_ssl_conf`` gives both the
same options explicitly, verifying by default.
"""

from __future__ import annotations

import re
import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
TLS_SCHEME = "rediss"
# Query parameters that are secrets themselves (redis-py accepts ``?password=``).
SECRET_QUERY_KEYS = ("password",)
# The TLS options a rediss:// URL's query may carry, as redis-py and Celery name them.
SSL_QUERY_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
             "none": ssl.CERT_NONE, "cert_required": ssl.CERT_REQUIRED,
             "cert_optional": ssl.CERT_OPTIONAL, "cert_none": ssl.CERT_NONE}
# ``scheme://user:password@`` anywhere in a text; the password ends at the last ``@``
# before the host, so a password holding ``@`` or ``:`` is masked whole.
_CREDENTIALS = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?P<secret>[^\s/]+)@",
                          re.IGNORECASE)
_SECRET_KEYS = "|".join(SECRET_QUERY_KEYS)
_SECRET_PARAMS = re.compile(rf"(?P<head>[?&](?:{_SECRET_KEYS})=)(?P<secret>[^&\s#]+)",
                            re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it (and ``?password=`` values) masked."""
    text = _CREDENTIALS.sub(lambda m: f"{m['head']}{MASK}@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m['head']}{MASK}", text)


def mask_url(url: str) -> str:
    """``url`` fit for a log: the password (if any) replaced with ``***``."""
    return redact(url)


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (in its credentials or its query)."""
    parts = urlsplit(url)
    return bool(parts.password) or any(
        key.lower() in SECRET_QUERY_KEYS for key, _ in parse_qsl(parts.query))


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its credentials (URL-safe passwords only, e.g. from
    ``secrets.token_urlsafe``); the user name, if any, is kept."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL (None for any other scheme): from its query,
    with the certificate verified unless the query says ``ssl_cert_reqs=none``."""
    parts = urlsplit(url)
    if parts.scheme != TLS_SCHEME:
        return None
    query = {key: value for key, value in parse_qsl(parts.query) if key in SSL_QUERY_KEYS}
    reqs = query.pop("ssl_cert_reqs", "required")
    if reqs.lower() not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={reqs!r} in the Redis URL: expected one of "
                         "required, optional, none")
    return {**query, "ssl_cert_reqs": CERT_REQS[reqs.lower()]}


def celery_ssl_conf(url: str) -> dict[str, Any]:
    """Celery settings for ``url`` as broker and result backend: ``broker_use_ssl`` and
    ``redis_backend_use_ssl`` for a ``rediss://`` URL, nothing otherwise."""
    options = ssl_options(url)
    if options is None:
        return {}
    return {"broker_use_ssl": dict(options), "redis_backend_use_ssl": dict(options)}
