"""Serving: export trained checkpoints to TF SavedModels (and, later, serve them).

This package is the only one that imports TensorFlow; training never does.
"""
