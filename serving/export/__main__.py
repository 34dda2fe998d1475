"""`python -m serving.export`: see `serving.export.cli`."""

import sys

from serving import native_logs

# Before anything imports TensorFlow: its start-up notices are dropped unless -v 1.
native_logs.quiet_native_logs(sys.argv)

from absl import app, flags  # noqa: E402

from serving.export import cli  # noqa: E402

# `--help` lists the exporter's flags (absl lists the key flags of the module run as __main__).
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
  app.run(cli.main)
