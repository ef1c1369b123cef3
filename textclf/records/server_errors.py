"""A tracking server's refusals (HTTP 401/403 from ``mlflow server --app-name basic-auth``) as one clear line, and
telling a server that cannot be reached from one that answered.

MLflow raises them as an ``MlflowException`` (``RestException`` when the body is JSON) with error code
``PERMISSION_DENIED`` or ``UNAUTHENTICATED``, or, from the artifact proxy, as a ``requests.HTTPError``;
their text names an endpoint and a status but not the server, the user, or what to do. The messages
built here say all three and never carry a password (neither ``MLFLOW_TRACKING_PASSWORD`` nor one
written into the tracking URI).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator
from urllib.parse import urlsplit

from textclf.errors import TextclfError

DENIED = {"PERMISSION_DENIED": 403}
UNAUTHENTICATED = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401}
_ENDPOINT = re.compile(r"endpoint (\S+)|for url: (\S+)")


def connection_error(exc: BaseException | None) -> BaseException | None:
    """The connection error or timeout behind an exception (MLflow wraps requests' errors), if any."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def refusal_error(exc: BaseException) -> TextclfError | None:
    """The TextclfError for a server's 401/403 found in ``exc`` or its causes; None for anything else."""
    status, detail = _refusal(exc)
    if status is None:
        return None
    uri = _tracking_uri()
    user = _username()
    if status == 403:
        return TextclfError(
            f"permission denied by the tracking server at {uri} for user {user or '(none)'}: {detail}; "
            "ask a user with MANAGE on the experiment (or registered model) to grant you EDIT, "
            "or use another experiment"
        )
    if not user:
        return TextclfError(
            f"the tracking server at {uri} requires a login: {detail}; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    return TextclfError(
        f"the tracking server at {uri} refused the login of user {user} (wrong user name or password): {detail}; "
        "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


@contextlib.contextmanager
def server_refusals() -> Iterator[None]:
    """Re-raise a tracking server's 401/403 as :class:`TextclfError`; anything else passes unchanged."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only refusals are translated, the rest re-raised as they were
        translated = refusal_error(exc)
        if translated is None:
            raise
        raise translated from exc


def _refusal(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, what was refused) of the first 401/403 in the exception chain."""
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MlflowException):
            code = str(getattr(exc, "error_code", ""))
            status = DENIED.get(code) or UNAUTHENTICATED.get(code)
            if status:
                return status, _detail(str(exc.message if hasattr(exc, "message") else exc), status)
        response = getattr(exc, "response", None)
        if response is not None and getattr(response, "status_code", None) in (401, 403):
            return response.status_code, _detail(str(exc), response.status_code)
        exc = exc.__cause__ or exc.__context__
    return None, ""


def _detail(message: str, status: int) -> str:
    match = _ENDPOINT.search(message)
    if match:
        path = urlsplit(match.group(1) or match.group(2)).path or match.group(1)
        return f"HTTP {status} on {path.rstrip('.')}"
    return f"HTTP {status}: {redact(message.splitlines()[0] if message else '')[:200]}"


def _tracking_uri() -> str:
    import mlflow

    return redact(mlflow.get_tracking_uri())


def _username() -> str | None:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_USERNAME") or urlsplit(mlflow.get_tracking_uri()).username or None


def redact(text: str) -> str:
    """``text`` without the tracking password and without passwords written into URLs (``user:***@``)."""
    text = re.sub(r"(://[^/\s:@]+):[^/\s@]*@", r"\1:***@", text)
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if password:
        text = text.replace(password, "***")
    return text
