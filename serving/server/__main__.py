"""`python -m serving.server`: see `serving.server.main`."""

from absl import app

from serving.server import main

if __name__ == "__main__":
  app.run(main.main)
