"""mammo-fusion core library.

Plain functions and small classes for data, models, hashing, classifiers, detection, metrics and
report. Never imports prefect or mlflow: orchestration and tracking live in ``tasks/``.
"""

__version__ = "0.1.0"
