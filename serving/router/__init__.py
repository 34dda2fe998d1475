"""Router mode: the model server's traffic policy, prediction log and shadow copies in front of
any TF-Serving-compatible backend (`python -m serving.router`; see serving/router/main.py)."""
