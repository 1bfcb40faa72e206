"""pytest-benchmark suite (a package, so its conftest does not shadow the tests' own)."""
