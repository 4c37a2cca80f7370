"""mammo-fusion core library.

Plain functions and small classes for data, models, hashing, classifiers, detection, metrics and
report. Never imports prefect or mlflow: orchestration and tracking live in ``tasks/``.

One process-wide setting is made here, before torch can be imported through this package: OpenMP
threads that spin while waiting (torch's default) collapse when the machine is shared. Measured on a
2-core machine with one other busy process, the smoke train stage took 165 s with spinning threads and
26 s with ``OMP_WAIT_POLICY=PASSIVE``. A value the user exported wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
