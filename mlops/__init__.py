"""The model lifecycle after training: tracking reports, hyperparameter search, the model registry
and validation gate, lineage and model cards, rollout (A/B, shadow, canary), monitoring and the
retraining pipeline. Each lives in a module of its own here.
"""
