"""The `mammo` CLI commands other than `run`, one module each.

Modules:
- ``compare_cmd``: ``mammo compare RUN_A RUN_B``: two ``mammo run`` runs side by side (params, metrics, report tables).
- ``predict_cmd``: ``mammo predict``: class probabilities of lesion patches, or lesion boxes on full mammograms.
- ``promote_cmd``: ``mammo promote RUN_ID``: move the ``champion`` alias to a run's registered models when they are
  better.
- ``report_cmd``: ``mammo report [RUN_ID]``: rebuild the report of one ``mammo run`` from the stage folders that run
  used.
- ``serve_cmd``: ``mammo serve``: an MLflow scoring server for one of this project's registered models, checked first.
- ``similar_cmd``: ``mammo similar IMAGE``: the k training lesions nearest to an image, from a finished pipeline run.
- ``weights_cmd``: ``mammo weights fetch [NAMES]``: the one command that downloads pretrained weights.
"""
