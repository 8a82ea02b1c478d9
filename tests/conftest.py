"""Shared test fixtures."""
from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread (restored afterwards).

    Tiny convolutions are far slower with 2 OpenMP threads on a busy 2-core runner; results do not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _open_handlers(handlers: list[logging.Handler]) -> list[logging.Handler]:
    return [h for h in handlers if not getattr(getattr(h, "stream", None), "closed", False)]


@pytest.fixture(autouse=True)
def restore_logging():
    """run_cli points the root logger at the running test's captured stderr, closed after that test: drop such
    handlers (left by this or other test modules) before each test and restore the root logger afterwards."""
    root = logging.getLogger()
    root.handlers[:] = _open_handlers(root.handlers)
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
