"""Serving: the JAX side that exports checkpoints (`serving.export`), the TensorFlow-only model
server (`serving.server`), the client, and what both sides agree on (`serving.contract`).

Training never imports this package; the server never imports JAX or `trainer`.
"""
