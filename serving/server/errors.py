"""The error a request that cannot be served raises, with the status TF Serving answers."""

from __future__ import annotations

import time

import grpc


class ServingError(Exception):
  """A request that cannot be served; `code` is the gRPC status TF Serving would answer."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


def deadline_exceeded(before: str) -> ServingError:
  """DEADLINE_EXCEEDED for a request whose deadline passed before `before` (what was about to
  happen): its client has given up, so its work is not started."""
  return ServingError(
    grpc.StatusCode.DEADLINE_EXCEEDED,
    f"the request's deadline passed before {before}; give the client a longer deadline "
    "(REST: --rest_api_timeout_in_ms) or serve with more capacity",
  )


def check_deadline(deadline: float | None, before: str) -> None:
  """Raises deadline_exceeded(before) once `deadline` (a time.monotonic() instant; None: none)
  has passed."""
  if deadline is not None and time.monotonic() >= deadline:
    raise deadline_exceeded(before)
