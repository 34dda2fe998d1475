"""`python -m serving.router`: see `serving.router.main`."""

import sys

from serving import native_logs

# Before anything imports TensorFlow: its start-up notices are dropped unless -v 1.
native_logs.quiet_native_logs(sys.argv)

from absl import app, flags  # noqa: E402

from serving.router import main  # noqa: E402

# `--help` lists the router's flags (absl lists the key flags of the module run as __main__).
flags.adopt_module_key_flags(main)

if __name__ == "__main__":
  app.run(main.main)
