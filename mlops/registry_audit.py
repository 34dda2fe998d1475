"""The append-only audit log of alias moves, which doubles as promote's write-ahead log.

One JSONL file per export base, `<export_base>/registry_audit.jsonl`, beside the version
directories it governs: the file must sit on the storage the model config file and the servers
share (the MLflow store may be a remote PostgreSQL with no file system of its own), and one
appended line is the only write that is atomic on every local file system. Each move is a
transaction of lines with one `txn` id:

  begin    (alias, from -> to, gate record, reason, forced, the model config file's old text)
  commit   (every step done) | abort (a step failed and the old state was restored)
  recover  (a later command found a begin without an end and restored the old state)

A lock file (`flock`, released by the kernel when its holder dies) serializes transactions of
one export base; a begin without an end whose lock is free is therefore a crashed transaction.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import json
import os
import time
import uuid

AUDIT_FILE = "registry_audit.jsonl"
LOCK_FILE = ".registry.lock"


def audit_path(export_base: str) -> str:
  return os.path.join(os.path.abspath(export_base), AUDIT_FILE)


@contextlib.contextmanager
def locked(export_base: str, timeout_s: float = 120.0):
  """Holds the export base's registry lock for the block. Raises TimeoutError after
  `timeout_s` (another registry command holds it)."""
  os.makedirs(export_base, exist_ok=True)
  path = os.path.join(export_base, LOCK_FILE)
  with open(path, "a") as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise TimeoutError(
            f"another registry command holds {path} for over {timeout_s:.0f} s"
          ) from None
        time.sleep(0.05)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def append(export_base: str, record: dict) -> dict:
  """Appends `record` (with time and user) as one line, flushed to disk; returns it."""
  record = {
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
    "user": _user(),
    **record,
  }
  line = json.dumps(record, sort_keys=True) + "\n"
  fd = os.open(audit_path(export_base), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, line.encode())
    os.fsync(fd)
  finally:
    os.close(fd)
  return record


def read(export_base: str) -> list[dict]:
  """Every record, oldest first (a torn last line, from a crash mid-write, is skipped)."""
  path = audit_path(export_base)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def new_txn() -> str:
  return uuid.uuid4().hex[:12]


def open_transactions(records: list[dict]) -> list[dict]:
  """The begin records with no commit, abort or recover after them."""
  ended = {r["txn"] for r in records if r.get("event") in ("commit", "abort", "recover")}
  return [r for r in records if r.get("event") == "begin" and r["txn"] not in ended]


def committed_moves(records: list[dict], name: str, alias: str) -> list[dict]:
  """The begin records of committed moves of `name@alias`, oldest first."""
  committed = {r["txn"] for r in records if r.get("event") == "commit"}
  return [
    r
    for r in records
    if r.get("event") == "begin"
    and r["txn"] in committed
    and r["name"] == name
    and r["alias"] == alias
  ]


def alias_history(records: list[dict], name: str, alias: str) -> list[int]:
  """The versions `alias` went through, as a stack: a promote pushes, a rollback pops, a
  remove empties it; the top is the current version and the one below it is where `rollback`
  goes."""
  stack: list[int] = []
  for move in committed_moves(records, name, alias):
    if move["to"] is None:  # `remove` (the canary's end): no version to roll back to.
      stack.clear()
    elif move["kind"] == "rollback" and len(stack) >= 2 and stack[-2] == move["to"]:
      stack.pop()
    else:
      stack.append(move["to"])
  return stack


def _user() -> str:
  try:
    return getpass.getuser()
  except (KeyError, OSError):
    return str(os.getuid())
