r"""The floor under any Python gRPC model server: a server whose one unary method returns the
request's bytes untouched (no parsing, no model, no metrics), built the way serving.server
builds its own (grpcio's sync server on a thread pool).

  .venv/bin/python bench/grpc_echo.py   # prints its port; serves until stdin closes

`bench/serving_latency.py` starts it beside the model servers and times an empty call's round
trip and the echo server's CPU per call, so the model server's overhead can be read against
what grpcio itself costs on the same machine in the same run.
"""

from __future__ import annotations

import os
import sys
from concurrent import futures

import grpc

METHOD = "/bench.Echo/Echo"


def _same_bytes(data: bytes) -> bytes:
  return data


def process_cpu_seconds(pid: int | str = "self") -> float:
  """User + system CPU seconds of process `pid` so far (from /proc)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
  handler = grpc.method_handlers_generic_handler(
    "bench.Echo",
    {
      "Echo": grpc.unary_unary_rpc_method_handler(
        lambda request, context: request,
        request_deserializer=_same_bytes,
        response_serializer=_same_bytes,
      )
    },
  )
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
  server.add_generic_rpc_handlers((handler,))
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  print(port, flush=True)
  sys.stdin.read()  # Until the parent closes it.
  server.stop(grace=None)


if __name__ == "__main__":
  main()
