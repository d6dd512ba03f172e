"""polymodal: build, train, evaluate and serve multimodal models."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the version pyproject.toml gives the installed package
    __version__ = version("polymodal")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
