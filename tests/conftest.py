"""Fixtures shared by every test directory come from the harness modules."""

pytest_plugins = [
    "tests.harness.mongo",
    "tests.harness.chroma",
    "tests.harness.proxy",
    "tests.harness.daemon",
]
