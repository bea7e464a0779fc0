"""A 500 tells the client what failed, never how the server's code looks (issue 33): the body names
the error's type; the traceback (which str() of a Ray error carries) stays in the server log."""

from __future__ import annotations

from cluster.errors import ServingError
from cluster.frontend import as_serving_error


class RemoteError(Exception):
    """Shaped like ray.exceptions.RayTaskError: str() is the remote traceback, `cause` the original."""

    def __init__(self, cause):
        super().__init__('Traceback (most recent call last):\n  File "/srv/actors/verifier_actor.py", line 9\n'
                         "KeyError: 'req-1'")
        self.cause = cause


def test_internal_errors_carry_no_traceback():
    err = as_serving_error(RemoteError(KeyError("req-1")))
    body = err.body()["error"]
    assert err.status == 500 and "KeyError" in body["message"]
    assert "Traceback" not in body["message"] and "verifier_actor.py" not in body["message"] and "\n" not in body["message"]
    typed = ServingError("verifier unavailable")
    assert as_serving_error(RemoteError(typed)) is typed  # typed errors pass through with their status
