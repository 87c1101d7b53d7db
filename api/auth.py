"""Optional bearer-token access control, the same for REST (both paths) and gRPC.

When ``ApiSettings.auth_token`` is set (``ppipe serve --auth-token`` or ``PPIPE_AUTH_TOKEN``),
every request must carry ``Authorization: Bearer <token>`` (gRPC: metadata ``authorization``)
except the health probes, which orchestrators call without credentials: REST
``GET /v2/health/live`` and ``/v2/health/ready``, gRPC ``ServerLive`` and ``ServerReady``.
Everything else needs the token, as Triton does for inference and administration:
inference, frames, model metadata and statistics, the repository index, ``/v2/status``,
``/metrics`` (Prometheus sends it with ``authorization: {credentials: ...}`` in its scrape
config) and the OpenAPI document.  Paths that match no route need it too, so that an
unauthenticated caller learns nothing of which paths exist.

A missing, malformed or wrong token is answered alike: HTTP 401 with ``WWW-Authenticate:
Bearer`` and ``{"error": "missing or invalid bearer token"}``; gRPC ``UNAUTHENTICATED`` with
that message.  The token is compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hmac

from ppipe_trt.errors import BadInputError

#: REST paths answered without a token (health probes).
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
#: gRPC methods answered without a token (health probes).
OPEN_RPCS = frozenset({"/inference.GRPCInferenceService/ServerLive",
                       "/inference.GRPCInferenceService/ServerReady"})
REFUSAL = "missing or invalid bearer token"
_REFUSAL_BODY = b'{"error":"missing or invalid bearer token"}'
_REFUSAL_HEADERS = [(b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(_REFUSAL_BODY)).encode())]
# RFC 6750's b64token characters: what fits in a header and in gRPC metadata unchanged.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                         "-._~+/=")


def check_token(token: str) -> str:
    """``token`` if it can be a bearer token (non-empty, RFC 6750 characters), else
    ``BadInputError``."""
    if not token or not set(token) <= _TOKEN_CHARS:
        raise BadInputError("the auth token must be a non-empty string of letters, digits "
                            "and -._~+/= (RFC 6750), e.g. from `openssl rand -hex 32`")
    return token


class BearerAuth:
    """Checks ``Authorization`` values against one token."""

    def __init__(self, token: str):
        self._token = check_token(token).encode("ascii")

    def allows(self, authorization: bytes | str | None) -> bool:
        """Whether an ``Authorization`` header value (or gRPC metadata value) carries the
        token; the scheme is case-insensitive (RFC 9110), the token compared in constant
        time."""
        if authorization is None:
            return False
        if isinstance(authorization, str):
            try:
                authorization = authorization.encode("ascii")
            except UnicodeEncodeError:
                return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(),
                                                                   self._token)

    def allows_scope(self, scope) -> bool:
        """Whether an ASGI HTTP request may go on: an open path, or the token in its
        ``Authorization`` header."""
        if scope["path"] in OPEN_PATHS:
            return True
        for key, value in scope["headers"]:
            if key == b"authorization":
                return self.allows(value)
        return False

    @staticmethod
    async def refuse(send) -> None:
        """Answer an ASGI HTTP request 401."""
        await send({"type": "http.response.start", "status": 401,
                    "headers": _REFUSAL_HEADERS})
        await send({"type": "http.response.body", "body": _REFUSAL_BODY})
