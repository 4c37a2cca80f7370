"""The pipeline stages, one module each (cache key, artifact folder, MLflow child run).

A stage module imports torch, torchvision, scikit-learn, h5py, matplotlib and the ``mammo_core`` modules
that need them inside the functions that run the stage, not at its top. Why: the registry imports every
stage module to compute every key, so a module-level ``import torch`` is paid by every ``mammo`` command,
including a cached rerun that trains nothing (7 of its 11 s on two cores).
``tests/stages/test_light_imports.py`` holds this line; the cache keys still cover those imports, since
:mod:`mammo_core.storage.code_closure` reads function bodies too.

Modules:
- ``acquire``: acquire: put a raw CBIS-DDSM-shaped dataset somewhere curate can read it, and inventory it.
- ``augment``: augment: the paper's augmentation policy as seeded copies of the training patches.
- ``baselines``: baselines: single-network classifiers (Table 6, Figure 10), Freeze3 + network fusions (section 4.7).
- ``classify``: classify: SVM, kNN and RF on the hash codes, fused by weighted soft voting, against learned combiners.
- ``curate``: curate: tables, patient splits and the preprocessed image cache (mammo_core.data.curation).
- ``detect``: detect: Faster R-CNN on the fused backbone with a hash head, its baselines, COCO/FROC metrics and latency.
- ``features``: features: per-branch and fused features for every patch, with fusion weights chosen on validation.
- ``hashing``: hashing: the divide-and-encode hash decoder and its FC ablation at each code length, retrieval MAP.
- ``patches``: patches: ROI-centred and NORMAL patches from the curated cache into ``patches.h5``.
- ``report``: report: the paper's Tables 1-8 and Figures 9-14 from this run's stage artifacts
  (mammo_core.reporting.report).
- ``train``: train: Freeze1..3 transfer learning on a shared frozen trunk (mammo_core.models.fused,
  mammo_core.training.loop).
"""
