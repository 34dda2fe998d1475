"""Checkpoint -> TF SavedModel (the JAX side): `python -m serving.export`.

`loading` restores a checkpoint for inference, `signatures` builds each serving signature from the
task, `exporter` converts them with jax2tf and writes a version directory, `parity` gates it on
JAX-vs-TF agreement and `compatibility` checks it against a TF Serving release.
"""
