"""Batch inference on Ray Data: `python -m serving.batch_predict` (see predict.py)."""
