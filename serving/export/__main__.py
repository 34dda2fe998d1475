"""`python -m serving.export`: see `serving.export.exporter`."""

from absl import app

from serving.export import exporter

if __name__ == "__main__":
  app.run(exporter.main)
