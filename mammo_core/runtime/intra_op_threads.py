"""Run a block of torch work with a given number of intra-op threads, then give the thread its count back.

Why one helper: augmentation runs its small patches on one thread (splitting them costs more than it saves), and
the detect stage times latency on one thread (a figure no OpenMP wait setting moves); both must restore what
the process had, even when the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """The block runs with ``threads`` intra-op threads; the count before it is set again after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
