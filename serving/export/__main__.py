"""`python -m serving.export`: see `serving.export.cli`."""

import sys

from serving import native_logs

# Before anything imports TensorFlow: its start-up notices are dropped unless -v 1.
native_logs.quiet_native_logs(sys.argv)

from absl import app  # noqa: E402

from serving.export import cli  # noqa: E402

if __name__ == "__main__":
  app.run(cli.main)
