"""Typed errors of the serving layer. Each carries its HTTP status and OpenAI error fields, so the
front end maps an error by its type, never by matching message text. They pickle (Ray and Serve
re-raise them in the caller, where `isinstance` still holds)."""

from __future__ import annotations


class ServingError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    headers: dict | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServingError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class UnsupportedParameter(BadRequest):
    code = "unsupported_parameter"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class UnknownDrafter(BadRequest):
    code = "unknown_drafter"


class ModelNotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class QueueFull(ServingError):
    status, type, code = 429, "rate_limit_error", "queue_full"
    headers = {"Retry-After": "1"}


class VerifierUnavailableError(ServingError):
    status, type, code = 503, "server_error", "verifier_unavailable"
    headers = {"Retry-After": "2"}


class DrafterStartFailed(ServingError):
    """A drafter's actors did not come up (bad checkpoint, or no room in the cluster)."""

    status, type, code = 503, "server_error", "drafter_start_failed"


class PlacementError(ServingError):
    """Actors the config asks for cannot be placed: the message names the short resource."""

    status, type, code = 503, "server_error", "insufficient_resources"


class DrafterNotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "not_found"


class DrafterExists(ServingError):
    status, type, code = 409, "invalid_request_error", "exists"
