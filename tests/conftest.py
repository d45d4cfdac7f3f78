"""Shared fixtures. Real services live in tests/services/ (one module per service)."""

pytest_plugins = [
    "tests.services.docker",
    "tests.services.s3",
    "tests.services.browser",
    "tests.built_examples",
    "tests.services.standins",
]
