from absl import app

from serving.batch_predict import main

if __name__ == "__main__":
  main.define_flags()
  app.run(main.main)
