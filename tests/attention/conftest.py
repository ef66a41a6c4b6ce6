"""Fixtures of the attention tests (tests/conftest.py's apply here too)."""
import pytest


@pytest.fixture
def one_process():
    """megatron's process groups for one process, for tests that build a model."""
    from megalong.parallel.distributed import initialize, shutdown

    initialize(1)
    yield
    shutdown()
