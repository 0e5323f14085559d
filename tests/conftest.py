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


_UNGROUPED = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """A pytest-xdist worker under `--dist loadgroup` sees each grouped test's id end in
    `@GROUP`. Without it (pytest 9.2 with pytest-xdist 3.8) the group is split over the
    workers and each sets up what the group shares: its tests fail and say so."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rsplit("::")[-1]:
            item.stash[_UNGROUPED] = (
                "--dist loadgroup does not group tests with this pytest and pytest-xdist: "
                "install the pytest version pyproject.toml allows"
            )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)
