"""The guards of continuous training: when an alert may start a retrain, and one pipeline at a time.

`decide(policy, state, observation, now)` is pure: given the guard state (persisted by
`watch` in a small JSON file, written atomically), what the monitor saw this interval and the
time, it returns the decision and the next state. `record_outcome` folds a retrain's result in.
The rules, in the order they are checked:

  1. the alert (drift or accuracy) persists in the last `persistence_windows` judged windows;
  2. after a retrain whose gate failed, nothing retrains until new labelled rows arrived
     (no flapping on the same alert and the same data);
  3. at least `min_new_labels` labelled rows arrived since the last retrain;
  4. `cooldown_s` passed since the last retrain;
  5. at most `max_retrains_per_day` retrains in the last 24 hours.

`PipelineLock` is a lock file holding pid and host: a second pipeline fails at once; a lock
whose process is gone (same host) is stale and taken over, so a crash never holds it forever.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

DAY_S = 86400.0


class GuardError(Exception):
  """Bad guard input or a held lock: the CLI prints `error: <message>` and exits 1."""


@dataclasses.dataclass(frozen=True)
class Policy:
  persistence_windows: int = 2
  cooldown_s: float = 3600.0
  min_new_labels: int = 100
  max_retrains_per_day: int = 3

  def check(self) -> None:
    """Raises GuardError naming the flag of a value out of range."""
    if self.persistence_windows < 1:
      raise GuardError(f"--persistence_windows={self.persistence_windows} must be at least 1")
    for name in ("cooldown_s", "min_new_labels", "max_retrains_per_day"):
      if getattr(self, name) < 0:
        raise GuardError(f"--{name}={getattr(self, name)} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Observation:
  """What one monitor pass saw: per judged window (oldest first) its alert kinds ([] = none),
  and the number of logged rows that have a feedback label."""

  window_alerts: tuple[tuple[str, ...], ...]
  labelled_rows: int

  def trailing_alerts(self) -> int:
    """How many of the latest judged windows in a row alert."""
    count = 0
    for kinds in reversed(self.window_alerts):
      if not kinds:
        break
      count += 1
    return count

  def latest_kinds(self) -> list[str]:
    return sorted(set(self.window_alerts[-1])) if self.window_alerts else []


@dataclasses.dataclass(frozen=True)
class State:
  """Guard state; `labels_at_retrain` is the labelled-row count the last retrain saw,
  `blocked_at_labels` the count at a retrain whose gate failed (None when not blocked)."""

  retrain_times: tuple[float, ...] = ()
  labels_at_retrain: int = 0
  blocked_at_labels: int | None = None
  last_outcome: str = ""

  def to_json(self) -> dict:
    return dataclasses.asdict(self) | {"retrain_times": list(self.retrain_times)}

  @classmethod
  def from_json(cls, data: dict) -> State:
    return cls(
      retrain_times=tuple(float(t) for t in data.get("retrain_times", ())),
      labels_at_retrain=int(data.get("labels_at_retrain", 0)),
      blocked_at_labels=data.get("blocked_at_labels"),
      last_outcome=str(data.get("last_outcome", "")),
    )


@dataclasses.dataclass(frozen=True)
class Decision:
  retrain: bool
  reason: str  # Why (not): the first guard that held it back, or the alert that starts it.
  alerts: list[str]


def decide(policy: Policy, state: State, seen: Observation, now: float) -> Decision:
  """Whether this observation starts a retrain (see the module docstring for the rules)."""
  alerts = seen.latest_kinds()
  trailing = seen.trailing_alerts()
  if trailing < policy.persistence_windows:
    why = "no alert" if not trailing else f"alert in {trailing} window(s) in a row"
    return Decision(False, f"{why}; needs {policy.persistence_windows}", alerts)
  if state.blocked_at_labels is not None and seen.labelled_rows <= state.blocked_at_labels:
    return Decision(
      False,
      f"the last retrain failed its gate at {state.blocked_at_labels} labelled rows; waiting "
      "for new labelled data",
      alerts,
    )
  new_labels = seen.labelled_rows - state.labels_at_retrain
  if new_labels < policy.min_new_labels:
    return Decision(
      False,
      f"{new_labels} new labelled rows since the last retrain; needs {policy.min_new_labels}",
      alerts,
    )
  if state.retrain_times and now - state.retrain_times[-1] < policy.cooldown_s:
    left = policy.cooldown_s - (now - state.retrain_times[-1])
    return Decision(False, f"cooldown: {left:.0f} s left of {policy.cooldown_s:.0f} s", alerts)
  today = [t for t in state.retrain_times if now - t < DAY_S]
  if len(today) >= policy.max_retrains_per_day:
    return Decision(
      False,
      f"daily cap: {len(today)} retrains in the last 24 h (max {policy.max_retrains_per_day})",
      alerts,
    )
  return Decision(
    True,
    f"{', '.join(alerts)} alert in {trailing} windows in a row, {new_labels} new labels",
    alerts,
  )


def record_outcome(state: State, seen: Observation, now: float, outcome: str) -> State:
  """The state after a retrain started at `now` ended with `outcome` (promoted, rejected,
  failed). A rejected candidate blocks retrains until new labelled rows arrive; so does a
  failed run (it would fail again on the same data). Keeps a day of retrain times."""
  times = (*(t for t in state.retrain_times if now - t < DAY_S), now)
  blocked = None if outcome == "promoted" else seen.labelled_rows
  return State(times, seen.labelled_rows, blocked, outcome)


def read_state(path: str) -> State:
  """The state in `path`, or a fresh one when the file does not exist. Raises GuardError for a
  file that is not a state file."""
  try:
    with open(path) as f:
      return State.from_json(json.load(f))
  except FileNotFoundError:
    return State()
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise GuardError(
      f"--state_file={path} is not a watch state file ({e}); move it away to start fresh"
    ) from e


def write_json_atomic(path: str, data: dict) -> None:
  """Writes `data` to a temporary file beside `path` and renames it over `path` (a reader
  sees the old or the new file, never half of one)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  with open(temporary, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def write_state(path: str, state: State) -> None:
  write_json_atomic(path, state.to_json())


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by another user.
    return True
  return True


class PipelineLock:
  """A lock file `path` holding {"pid", "host", "started"}. `acquire` raises GuardError while
  another live process holds it; a holder on this host whose pid is gone is stale and taken
  over. A holder on another host cannot be checked: it is honoured (the error says how to
  clear it). Use as a context manager; `release` removes the file only if it is still ours.
  `what` names the holder in the error (the canary controller takes one per model too)."""

  def __init__(self, path: str, clock=time.time, what: str = "a pipeline"):
    self.path = path
    self._clock = clock
    self._what = what
    self._owner = {"pid": os.getpid(), "host": socket.gethostname()}

  def holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # Torn or foreign: treated as stale below (no pid to wait for).

  def is_stale(self, holder: dict) -> bool:
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
      return True
    return holder.get("host") == self._owner["host"] and not _pid_alive(holder["pid"])

  def check_free(self) -> None:
    """Raises GuardError when a live process holds the lock (a cheap early check; `acquire`
    decides)."""
    holder = self.holder()
    if holder is not None and not self.is_stale(holder):
      raise GuardError(self._held_message(holder))

  def _held_message(self, holder: dict) -> str:
    return (
      f"{self._what} is already running (pid {holder['pid']} on {holder.get('host')}, "
      f"since {holder.get('started')}; lock {self.path}); wait for it, or remove the lock "
      "if that process is gone"
    )

  def acquire(self) -> None:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    # The check and the write happen under an flock of a side file, so two processes that both
    # find a stale lock cannot both take it over.
    with open(f"{self.path}.guard", "a") as guard:
      fcntl.flock(guard, fcntl.LOCK_EX)
      holder = self.holder()
      if holder is not None and not self.is_stale(holder):
        raise GuardError(self._held_message(holder))
      write_json_atomic(self.path, {**self._owner, "started": self._clock()})

  def release(self) -> None:
    holder = self.holder()
    if (
      holder
      and holder.get("pid") == self._owner["pid"]
      and holder.get("host") == self._owner["host"]
    ):
      os.remove(self.path)

  def __enter__(self) -> PipelineLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
