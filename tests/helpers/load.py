"""Live REST traffic for a test's model server, from client threads, bounded by `stop` and time."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np

from tests.helpers import model_server


class Load:
  """Client threads sending REST Predicts of `rows_per_request` rows (cycling through `rows`,
  default two digits), a new x-user-id and x-request-id each, until stopped or `max_seconds`.

  With `labels`, every answered request's rows get their feedback labels through the server's
  feedback endpoint. With `when`, the threads wait (polling it) until it returns True, e.g. until
  a canary has weight. `sent` counts requests per thread; `failed` holds the request ids of
  non-200 answers.
  """

  def __init__(
    self,
    server,
    tag: str,
    *,
    model: str = "digits",
    rows: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    rows_per_request: int = 2,
    when: Callable[[], bool] | None = None,
    threads: int = 2,
    max_seconds: float = 300.0,
  ):
    self.server, self.model, self.tag = server, model, tag
    self.rows = model_server.digits_pixels(2) if rows is None else rows
    self.labels, self.rows_per_request, self.when = labels, rows_per_request, when
    self.deadline = time.monotonic() + max_seconds
    self.sent, self.failed = [0] * threads, []
    self.stop = threading.Event()
    self.threads = [threading.Thread(target=self._send, args=(t,)) for t in range(threads)]

  def _post(self, path: str, body: dict, headers: dict) -> None:
    request = urllib.request.Request(
      f"{self.server.url}/v1/models/{self.model}{path}", json.dumps(body).encode(), headers
    )
    with urllib.request.urlopen(request, timeout=30):
      pass

  def _running(self) -> bool:
    return not self.stop.is_set() and time.monotonic() < self.deadline

  def _send(self, thread: int) -> None:
    while self.when is not None and self._running() and not self.when():
      self.stop.wait(0.05)
    while self._running():
      count = self.sent[thread]
      self.sent[thread] += 1
      request_id = f"{self.tag}-{thread}-{count}"
      first = (count * len(self.threads) + thread) * self.rows_per_request % len(self.rows)
      picked = np.arange(first, first + self.rows_per_request) % len(self.rows)
      headers = {"x-user-id": request_id, "x-request-id": request_id}
      try:
        self._post(":predict", {"instances": self.rows[picked].tolist()}, headers)
      except urllib.error.HTTPError:
        self.failed.append(request_id)
        continue
      for row, index in enumerate(picked if self.labels is not None else ()):
        feedback = {"request_id": request_id, "label": int(self.labels[index]), "row": row}
        self._post("/feedback", feedback, {})

  def __enter__(self) -> Load:
    for thread in self.threads:
      thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.set()
    for thread in self.threads:
      thread.join(timeout=60)
