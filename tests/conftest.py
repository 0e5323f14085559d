"""Fixtures shared by every test directory come from the harness modules."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.harness.mongo",
    "tests.harness.chroma",
    "tests.harness.proxy",
    "tests.harness.daemon",
    # One Phoenix per test session: a module that imported the fixture itself
    # would get a Phoenix of its own.
    "tests.harness.phoenix",
]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep the tests that share Phoenix on one pytest-xdist worker (`--dist loadgroup`,
    as `make test` runs): each worker starts its own session servers, and Phoenix is the
    slowest of them to start."""
    for item in items:
        if "phoenix_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("phoenix"))
