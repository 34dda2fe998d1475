"""Fault injection for the registry's crash tests: `MLOPS_REGISTRY_KILL_AT=<point>` makes the
process SIGKILL itself at that point (as a power cut would), so tests can check that every
state a crash leaves is consistent after a restart. Unset, `point` does nothing."""

from __future__ import annotations

import os
import signal

ENV = "MLOPS_REGISTRY_KILL_AT"


def point(name: str) -> None:
  if os.environ.get(ENV) == name:
    os.kill(os.getpid(), signal.SIGKILL)
