"""A stand-in for a jitted train step as the training loop uses it (`.lower(...).compile()`)."""

from __future__ import annotations

import types
from collections.abc import Callable


class WrappedStep:
  """Wraps a jitted step: counts its lowerings and the calls of its compiled executable, and
  passes each call's `(state, metrics)` through `after` (default: unchanged)."""

  def __init__(self, jitted, after: Callable | None = None):
    self.jitted, self.after = jitted, after or (lambda state, metrics: (state, metrics))
    self.lowerings, self.calls = 0, 0

  def lower(self, *args):
    self.lowerings += 1
    compiled = self.jitted.lower(*args).compile()

    def call(*call_args):
      self.calls += 1
      return self.after(*compiled(*call_args))

    return types.SimpleNamespace(compile=lambda: call)
