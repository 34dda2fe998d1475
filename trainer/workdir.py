"""`check_workdir`: is `--workdir` a directory this run can create (or reuse) and write?

Checked before any data is read or anything is written, so a bad workdir fails in a second with
one line, not after the model is built.
"""

from __future__ import annotations

import os

from trainer.errors import ConfigError

# Virtual filesystems: writable-looking paths whose files are not files.
_VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")


def check_workdir(workdir: str | None) -> str:
  """Returns `workdir` if it is, or can be created as, a writable directory; never creates it.

  Raises ConfigError naming the path and the fix when it is empty, a file, under a virtual
  filesystem (/proc, /sys, /dev), not writable, or below a file or an unwritable directory.
  """
  if workdir is None or not workdir.strip():
    missing = "missing" if workdir is None else "empty"
    raise ConfigError(
      f"--workdir is {missing}; pass a directory for the run, e.g. --workdir=/tmp/run1"
    )
  real = os.path.realpath(os.path.expanduser(workdir))
  for root in _VIRTUAL_ROOTS:
    if real == root or real.startswith(root + os.sep):
      raise ConfigError(
        f"--workdir={workdir} lies under {root}, a virtual filesystem that cannot hold "
        "checkpoints; choose a directory on a disk, e.g. --workdir=/tmp/run1"
      )
  if os.path.exists(real):
    if not os.path.isdir(real):
      raise ConfigError(
        f"--workdir={workdir} is a file, not a directory; choose another path or remove the file"
      )
    _check_writable(real, workdir, what="directory")
    return workdir
  parent = os.path.dirname(real)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(
      f"--workdir={workdir} cannot be created: {parent} is a file, not a directory; "
      "choose another path"
    )
  _check_writable(parent, workdir, what="parent directory")
  return workdir


def _check_writable(directory: str, workdir: str, *, what: str) -> None:
  # os.access answers for the real user, root included (EROFS for read-only mounts).
  if not os.access(directory, os.W_OK | os.X_OK):
    shown = "" if directory == os.path.realpath(workdir) else f" (its {what} {directory})"
    raise ConfigError(
      f"--workdir={workdir} is not writable{shown}; fix its permissions or choose another "
      "directory, e.g. --workdir=/tmp/run1"
    )
