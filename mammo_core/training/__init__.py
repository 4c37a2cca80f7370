"""Training the fused model: the loop, its schedule, checkpoints, the device chooser.

Modules:
- ``checkpoint``: Training checkpoints: atomic writes, safe reads, RNG states that survive ``weights_only`` loading.
- ``devices``: Which device a task uses when a scheduler assigned it a GPU.
- ``loop``: Training the Freeze1..3 branches: shared trunk, cached trunk, or three separate trainings.
- ``schedule``: The Freeze1..3 training schedule: optimiser settings, learning-rate steps, warm-up and roll-back.
"""
