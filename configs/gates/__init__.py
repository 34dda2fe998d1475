"""Validation-gate thresholds (`python -m mlops.validate --gate=configs/gates/<model>.py`)."""
