"""Installs the framework's packages; pinned dependencies come from requirements.lock."""

from setuptools import find_packages, setup

setup(
  name="jax-trainer",
  version="0.1.0",
  description="Train sharded JAX/Flax models, checkpoint and resume them, export and serve them.",
  python_requires=">=3.11",
  packages=find_packages(include=["trainer*", "models*", "configs*", "serving*"]),
  install_requires=[
    "absl-py",
    "array-record",
    "flax",
    "grain",
    "jax",
    "ml-collections",
    "numpy",
    "optax",
    "orbax-checkpoint",
    "scikit-learn",
    "tensorboardX",
  ],
  # The serving side: export to SavedModel and serve it. Training never imports these.
  extras_require={"serving": ["orbax-export", "tensorflow", "tensorflow-serving-api"]},
)
