"""MLflow-free serving code: the inputs a served model accepts.

Modules:
- ``served_inputs``: What a served model accepts from a caller: a path policy and size caps, decided when the server
  starts.
"""
