"""The error a request that cannot be served raises, with the status TF Serving answers."""

from __future__ import annotations

import grpc


class ServingError(Exception):
  """A request that cannot be served; `code` is the gRPC status TF Serving would answer."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message
