"""The ``polymodal`` command line (``polymodal.cli:app``)."""

from polymodal.cli.main import app

__all__ = ["app"]
