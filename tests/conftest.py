"""Fixtures shared by every test directory come from the harness modules."""

pytest_plugins = [
    "tests.harness.mongo",
    "tests.harness.chroma",
    "tests.harness.proxy",
    "tests.harness.daemon",
    # One Phoenix per test session: a module that imported the fixture itself
    # would get a Phoenix of its own.
    "tests.harness.phoenix",
]
