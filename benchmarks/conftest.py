"""Plain `pytest` runs every microbenchmark once as a smoke test (and skips torch.compile, which
takes seconds per shape to compile); `pytest --benchmark-only` times them properly."""
import pytest


def pytest_configure(config):
    if not config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


@pytest.fixture
def timing_enabled(request) -> bool:
    return not request.config.getoption("benchmark_disable", False)
