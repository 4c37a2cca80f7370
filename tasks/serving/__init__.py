"""The models the stages log to MLflow and the server loads: classifier, detector, card, trust.

Modules:
- ``classifier``: The end-to-end classifier as an MLflow pyfunc model: patch -> branches -> fusion -> hash codes ->
  SVM/kNN/RF.
- ``detector``: The lesion detector as an MLflow pyfunc model: full mammogram -> boxes with class and score.
- ``model_card``: The model card logged with each registered model: what it takes, what it says, what it was trained on.
- ``registration``: Logging and registering one of the served models in MLflow, written once for both of them.
- ``model_trust``: Only this project's own registered models are loaded, and only when their files are the registered
  ones.
"""
