"""The HTTP server: OpenAI's API over a folder of saved models, with its SQLite store.

``polymodal serve --models DIR`` runs :func:`create_app` with uvicorn. The modules, top down:
``app`` (routes, the API key and body limit), ``chat`` (decoded messages and the responder that
replies to them: the seam where the assistant pipeline plugs in), ``registry`` (the served models,
their locks and the embedding batcher), ``store`` (SQLite), ``media`` (data URLs, images and audio
within limits), ``voice`` (speech through :mod:`polymodal.speech`), ``schemas`` (request bodies),
``errors`` (OpenAI's error envelope), ``settings`` (limits and options).
"""

from polymodal.serve.app import create_app
from polymodal.serve.chat import ModelResponder, Reply, ReplyOptions, Responder, Turn
from polymodal.serve.settings import Limits, Settings

__all__ = ["Limits", "ModelResponder", "Reply", "ReplyOptions", "Responder", "Settings", "Turn", "create_app"]
