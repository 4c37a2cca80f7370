"""One torch thread for a test module: import :func:`one_torch_thread` into the module (autouse).

Why: the tests' tensors are tiny; they gain nothing from threads, and OpenMP spinning makes two threads crawl
on a busy 2-core machine, so these modules run on one thread and restore the count afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
