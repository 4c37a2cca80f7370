"""mammo-fusion core library.

Plain functions and small classes for data, models, hashing, classifiers, detection, metrics and
report. Never imports prefect or mlflow: orchestration and tracking live in ``tasks/``.

One process-wide setting is made here, before torch can be imported through this package: how OpenMP
threads wait between parallel regions (``OMP_WAIT_POLICY=PASSIVE`` unless the user chose; measured trade-off
and how to choose otherwise in :mod:`mammo_core.runtime.openmp_wait`).
"""

from mammo_core.runtime import openmp_wait

openmp_wait.set_default()

__version__ = "0.1.0"
