from absl import app, flags

from serving.batch_predict import main

if __name__ == "__main__":
  main.define_flags()
  flags.adopt_module_key_flags(main)  # `--help` lists them.
  app.run(main.main)
