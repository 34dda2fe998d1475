"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, `initdb` + `pg_ctl`.

The data directory lives in a fresh directory under /tmp owned by the `postgres` user (pytest's
own tmp dirs are 0700 under root, which that user cannot enter); the server listens on a free
loopback port with trust authentication, runs with fsync off, and is stopped by the PID in its
`postmaster.pid`. Run as root, the server commands run as `postgres` (PostgreSQL refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 20


def find_bin_dir() -> str | None:
  """The directory holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
  on_path = shutil.which("pg_ctl")
  if on_path and shutil.which("initdb"):
    return os.path.dirname(os.path.realpath(on_path))
  candidates = sorted(
    glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
    key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
  )
  return os.path.dirname(candidates[-1]) if candidates else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class PostgresServer:
  """One server for a test session. `start()` then `database(name)` URLs, then `stop()`."""

  def __init__(self, bin_dir: str):
    self.bin_dir = bin_dir
    self.port = _free_port()
    self.base = tempfile.mkdtemp(prefix="pytest-postgres-", dir="/tmp")
    self.data = os.path.join(self.base, "data")
    self._as_postgres = os.geteuid() == 0
    self.user = "postgres" if self._as_postgres else pwd.getpwuid(os.geteuid()).pw_name
    if self._as_postgres:
      entry = pwd.getpwnam("postgres")
      os.chown(self.base, entry.pw_uid, entry.pw_gid)
    os.chmod(self.base, 0o755)

  def _run(self, *args: str, timeout: float) -> None:
    kwargs = {"user": "postgres"} if self._as_postgres else {}
    result = subprocess.run(
      [os.path.join(self.bin_dir, args[0]), *args[1:]],
      capture_output=True,
      text=True,
      timeout=timeout,
      cwd=self.base,
      check=False,
      **kwargs,
    )
    if result.returncode:
      log = os.path.join(self.base, "server.log")
      tail = ""
      if os.path.exists(log):
        with open(log) as f:
          tail = f.read()[-2000:]
      raise RuntimeError(f"{args[0]} failed: {result.stderr.strip()}\n{tail}")

  def start(self) -> None:
    self._run(
      "initdb",
      "-D",
      self.data,
      "-A",
      "trust",
      "-U",
      self.user,
      "-E",
      "UTF8",
      "--no-sync",
      timeout=_START_TIMEOUT_S,
    )
    options = (
      f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
      "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )
    self._run(
      "pg_ctl",
      "-D",
      self.data,
      "-o",
      options,
      "-l",
      os.path.join(self.base, "server.log"),
      "-w",
      "-t",
      str(_START_TIMEOUT_S),
      "start",
      timeout=_START_TIMEOUT_S + 10,
    )

  def url(self, database: str = "postgres") -> str:
    return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

  def database(self, name: str) -> str:
    """Creates database `name` and returns its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(
      host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True
    ) as connection:
      connection.execute(f'CREATE DATABASE "{name}"')
    return self.url(name)

  def stop(self) -> None:
    """Fast shutdown by the PID in postmaster.pid (SIGINT), SIGKILL after a deadline."""
    pid_file = os.path.join(self.data, "postmaster.pid")
    try:
      with open(pid_file) as f:
        pid = int(f.readline())
    except (OSError, ValueError):
      pid = None
    if pid:
      try:
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while time.monotonic() < deadline and os.path.exists(pid_file):
          time.sleep(0.1)
        if os.path.exists(pid_file):
          os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    shutil.rmtree(self.base, ignore_errors=True)
