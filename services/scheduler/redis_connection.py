"""Connect the scheduler to Redis: password from a mounted file, checked at start.

The password comes from the URL (`redis://:PASSWORD@host:6379/0`) or, better
in a cluster, from a file (`--redis-password-file`, a mounted Secret) so it
shows up in neither the pod spec nor `ps`. A wrong or missing password fails
the start with a message that says so, instead of failing the first request.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from llmexec.errors import FailedPreconditionError, UnavailableError


def read_password_file(path: str) -> str:
    """The password in `path`, without its trailing newline; "" when path is ""."""
    if not path:
        return ""
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise FailedPreconditionError(f"cannot read the Redis password file {path!r}: {exc.strerror}") from exc


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def connect_redis(url: str, password: str = "", wait_seconds: float = 60.0) -> redis.Redis:
    """A client for `url` that has answered PING; `password` is used unless the URL has one.

    Waits up to `wait_seconds` for Redis to come up (in a cluster it may start
    after us); a refused password fails at once.
    """
    client = redis.Redis.from_url(url, password=password or None)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.ping()
            return client
        except redis.AuthenticationError as exc:
            raise FailedPreconditionError(
                f"Redis at {redact(url)} refused the connection: {exc}; "
                "give its password with --redis-password-file (or in the URL)"
            ) from exc
        except redis.ResponseError as exc:
            # NOAUTH arrives as a ResponseError on some Redis versions.
            if "NOAUTH" in str(exc) or "AUTH" in str(exc):
                raise FailedPreconditionError(
                    f"Redis at {redact(url)} requires a password: give it with --redis-password-file"
                ) from exc
            raise
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise UnavailableError(f"Redis at {redact(url)} did not answer for {wait_seconds:.0f}s: {exc}") from exc
            time.sleep(0.5)
