"""MLflow-free serving code: what a served model accepts, computes and answers (``tasks.serving.classifier`` wraps it
for MLflow and registers it).

Modules:
- ``served_inputs``: What a served model accepts from a caller: a path policy and size caps, decided when the server
  starts.
- ``served_classifier``: The patch classifier chain (decoding, bit depth and intensity rules, batching, output table).
- ``served_detector``: The lesion detector (mammogram reading, detection in original pixels, output table, overlays).
"""
