"""numbabn's version, read from the installed package's metadata (pyproject.toml defines it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("numbabn")
except PackageNotFoundError:  # a checkout imported without being installed
    __version__ = "0+unknown"
