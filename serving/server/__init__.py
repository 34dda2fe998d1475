"""The TF-Serving-compatible model server: `python -m serving.server`.

TensorFlow only: nothing in this package imports JAX, Flax or `trainer` (a test checks).
"""
