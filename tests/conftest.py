"""Fixtures live in plugin modules, one per concern, so each area owns its own file."""

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fake_headers",
    "tests.fixtures_farm",
    "tests.fixtures_s3",
]
