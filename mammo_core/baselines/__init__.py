"""Baselines for the paper's Tables 1 and 6 and Figure 10 (the ``baselines`` stage).

- :mod:`~mammo_core.baselines.networks`: VGG16, InceptionV3, ResNet50, DenseNet-121 with new heads and
  the input adaptation (grey to 3 channels, upsampling to each network's minimum side).
- :mod:`~mammo_core.baselines.train`: their training under the branches' schedule and checkpoint contract.
- :mod:`~mammo_core.baselines.units`: one sealed, separately cached unit per trained network.
- :mod:`~mammo_core.baselines.latency`: per-image latency measured side by side.
- :mod:`~mammo_core.baselines.sift_bovw`: SIFT bag of visual words + SVM.
- :mod:`~mammo_core.baselines.agnet`: an AGNet-style fusion of two different architectures' features.
"""
