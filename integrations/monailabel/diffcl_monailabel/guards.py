"""Request guards for a MONAI Label server (standard library only, so they are testable without MONAI Label).

MONAI Label 0.8.5 trusts its identifiers: ``/infer/<model>?image=<id>`` reads ``<id>`` as a file when such a path
exists on the server (``../../etc/passwd`` included), ``PUT /datastore/image?image=<id>`` writes
``<studies>/<id><ext>`` (a ``../`` id writes outside the datastore), and uploads are copied to disk whatever their
size. Two layers close that:

* :class:`RequestGuard`, an ASGI middleware wrapped around MONAI Label's FastAPI app
  (``monailabel start_server --uvicorn_app diffcl_monailabel.asgi:app``): 400 for a URL path with a ``..``
  segment, a backslash or a control character, for an identifier query parameter (:data:`ID_PARAMS`) that is not
  a plain name (:func:`is_safe_id`) and for ``uncompress=true`` (session archives are unpacked unfiltered);
  403 for ``PUT`` / ``DELETE /model/<model>`` (which overwrite / rename the served checkpoint); 413 for a request
  body over the limit, announced (``Content-Length``) or streamed (chunked), before the application sees more than
  the limit (nothing of it reaches the disk);
* :func:`check_image_request`, called by the app's ``infer`` (``app/main.py``): the image of an inference request
  (which MONAI Label lets the ``params`` form field override) must be a datastore id, a file MONAI Label itself
  uploaded to the temporary directory or a session's image (400 otherwise, 404 for an unknown id), whether or not
  the middleware is on.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Awaitable, Callable, MutableMapping, Optional, Sequence
from urllib.parse import parse_qsl

__all__ = [
    "DEFAULT_BLOCKED",
    "DEFAULT_DRAIN_BYTES",
    "DEFAULT_MAX_BODY_MB",
    "ID_PARAMS",
    "GuardError",
    "RequestGuard",
    "check_image_request",
    "is_safe_id",
    "is_under",
    "is_upload_path",
    "path_problem",
    "query_problem",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_MB = 256.0
DEFAULT_DRAIN_BYTES = 64 * 1024 * 1024
# (method, path prefix) refused with 403: MONAI Label's PUT /model/<model> overwrites the served checkpoint file with
# the upload and DELETE /model/<model> renames it away
DEFAULT_BLOCKED = (("PUT", "/model/"), ("DELETE", "/model/"))
# query parameters of MONAI Label's endpoints that name datastore objects or sessions
ID_PARAMS = frozenset({"image", "label", "id", "image_id", "label_id", "tag", "session_id"})
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
# tempfile.NamedTemporaryFile(suffix=...).name as MONAI Label's /infer upload names it: tmp + 8 characters + suffixes
_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}(\.[A-Za-z0-9]{1,16}){0,3}")


class GuardError(Exception):
    """A request the guards refuse, with the HTTP status to answer (4xx) and a message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def is_safe_id(value: str) -> bool:
    """Whether ``value`` is a plain identifier: letters, digits, ``_ . -``, no leading dot, no ``..``, <= 255 chars.

    Datastore ids are file names without extension (``la_001``, DICOM UIDs ``1.2.840...``); anything with a path
    separator, a parent reference or a control character is not one.
    """
    return bool(_SAFE_ID.fullmatch(value)) and ".." not in value


def is_upload_path(path: str, tmp_dir: Optional[str] = None) -> bool:
    """Whether ``path`` is a file that MONAI Label's ``/infer`` upload created (``<tmp>/tmpXXXXXXXX<suffixes>``)."""
    tmp = os.path.realpath(tmp_dir or tempfile.gettempdir())
    real = os.path.realpath(path)
    return (
        os.path.dirname(real) == tmp
        and os.path.basename(path) == os.path.basename(real)
        and bool(_UPLOAD_NAME.fullmatch(os.path.basename(real)))
        and os.path.isfile(real)
    )


def path_problem(path: str) -> Optional[str]:
    """Why a (percent-decoded) URL path is refused, or None: a ``..`` segment, a backslash or a control character."""
    if any(ord(c) < 32 for c in path) or "\\" in path:
        return "URL path contains a backslash or a control character"
    if ".." in path.split("/"):
        return "URL path contains a '..' segment"
    return None


def query_problem(query_string: bytes) -> Optional[str]:
    """Why a query string is refused, or None: an identifier parameter (:data:`ID_PARAMS`) that is not a plain id,
    or ``uncompress=true`` (a session upload unpacked as an archive)."""
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return "malformed query string"
    for name, value in pairs:
        if name in ID_PARAMS and value and not is_safe_id(value):
            return f"query parameter '{name}' must be a plain id (letters, digits, '_', '.', '-'; no '..', no '/')"
        if name == "uncompress" and value.strip().lower() in ("1", "true", "yes", "on"):
            # PUT /session/?uncompress=true unpacks an uploaded archive with shutil.unpack_archive, which on
            # Python < 3.14 does not stop tar members named ../x or /x
            return "uncompress is refused: archive members could be written outside the session folder"
    return None


def is_under(path: str, folders: Sequence[str]) -> bool:
    """Whether ``path`` exists and resolves (symbolic links followed) to somewhere inside one of ``folders``."""
    real = os.path.realpath(path)
    for folder in folders:
        root = os.path.realpath(folder)
        if real != root and os.path.commonpath([real, root]) == root and os.path.exists(real):
            return True
    return False


def check_image_request(
    request: MutableMapping[str, Any], known_image: Callable[[str], bool], trusted_dirs: Sequence[str] = ()
) -> None:
    """Validate the ``image`` / ``label`` of an inference request (after MONAI Label merged ``params`` into it).

    Args:
        request: the request dict given to ``MONAILabelApp.infer``.
        known_image: whether a plain id names an image of the datastore.
        trusted_dirs: folders whose files may be the image (MONAI Label's session store: ``?session_id=``).

    Raises:
        GuardError: 400 for a path-like or non-string image, an image path that is neither an upload nor in
            ``trusted_dirs``, a label that is not an upload or a ``model_filename``; 404 for an unknown image id.
    """
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise GuardError(400, "image must be a datastore id or an uploaded file")
    if not (is_upload_path(image) or is_under(image, trusted_dirs)):
        if not is_safe_id(image):
            raise GuardError(400, "image must be a datastore id (no paths)")
        if not known_image(image):
            raise GuardError(404, f"image {json.dumps(image)} is not in the datastore")
    label = request.get("label")
    if label is not None and not (isinstance(label, str) and is_upload_path(label)):
        raise GuardError(400, "label must be an uploaded file")
    if "model_filename" in request:
        raise GuardError(400, "model_filename is not accepted: the app serves one checkpoint per model")


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: 400 for traversing paths / identifiers, 403 for blocked endpoints, 413 for large bodies.

    A refused body is read and dropped (up to ``drain_bytes`` more) before the 413 goes out, so that a client that
    sends its whole body before reading the answer (``requests``, ``urllib``) gets the 413 rather than a reset
    connection; a client that announced ``Expect: 100-continue`` (``curl`` for large bodies) is answered at once and
    sends nothing. Nothing of a refused body reaches the application or the disk.

    Args:
        app: the wrapped ASGI application (MONAI Label's FastAPI app).
        max_body_bytes: largest request body accepted; a larger ``Content-Length`` is refused before the
            application runs, and a streamed (chunked) body is cut off as soon as it passes the limit.
        drain_bytes: at most this many bytes of a refused body are read and dropped before answering.
        blocked: ``(method, path prefix)`` pairs answered 403 (default: checkpoint upload / deletion).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        drain_bytes: int = DEFAULT_DRAIN_BYTES,
        blocked: Sequence[tuple[str, str]] = DEFAULT_BLOCKED,
    ) -> None:
        if max_body_bytes < 0 or drain_bytes < 0:
            raise ValueError(f"max_body_bytes and drain_bytes must be >= 0, got {max_body_bytes}, {drain_bytes}")
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.drain_bytes = int(drain_bytes)
        self.blocked = tuple((m.upper(), p) for m, p in blocked)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request, then run the app with a byte-counting ``receive``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        problem = path_problem(path) or query_problem(scope.get("query_string", b""))
        if problem:
            await _reply(send, 400, problem)
            return
        method = scope.get("method", "GET").upper()
        if any(method == m and path.startswith(p) for m, p in self.blocked):
            await _reply(send, 403, f"{method} {path} is disabled on this server")
            return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await _reply(send, 400, "invalid Content-Length")
                return
            if int(length) > self.max_body_bytes:
                expects_continue = (_header(scope, b"expect") or "").lower() == "100-continue"
                if not expects_continue and int(length) <= self.drain_bytes:
                    await _drain(receive, self.drain_bytes)
                await _reply(send, 413, self._too_large())
                return
        await self._run(scope, receive, send)

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"received": 0, "too_large": False, "started": False}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["too_large"] = True
                    if message.get("more_body", False):
                        await _drain(receive, self.drain_bytes)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["too_large"]:
                return  # the app's answer to the aborted body (an error) is replaced by the 413 below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["too_large"]:
                raise
        if state["too_large"] and not state["started"]:
            await _reply(send, 413, self._too_large())

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes"


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a request body, at most ``limit`` bytes (stops at a disconnect)."""
    drained = 0
    while drained <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
