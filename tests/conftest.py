"""Shared fixtures. Real services live in tests/services/ (one module per service)."""

pytest_plugins = [
    "tests.services.docker",
    "tests.services.auth_registry",
    "tests.services.s3",
    "tests.services.browser",
    "tests.built_examples",
    "tests.services.standins",
]
