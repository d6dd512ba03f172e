"""polymodal: build, train, evaluate and serve multimodal models."""

__version__ = "0.1.0"
