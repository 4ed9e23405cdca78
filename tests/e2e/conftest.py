"""Everything under tests/e2e/ starts real processes (the fedfleet command, examples, torchrun ranks, parties):
each test is marked ``slow``, so ``make test-fast`` (``-m 'not slow'``) leaves them to ``make test``."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)
