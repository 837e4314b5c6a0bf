import pytest

from dittofx.cli import progress


@pytest.fixture(autouse=True)
def _quiet():
    """No progress lines from the exporters' stages in the test output."""
    progress.set_quiet(True)
    yield
    progress.set_quiet(False)
