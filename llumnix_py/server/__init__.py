"""OpenAI-compatible HTTP frontend: ``create_app(cluster)``, ``serve(app)``, ``ServerThread``, ``Metrics``."""

from llumnix_py.server.app import ServerThread, create_app, serve
from llumnix_py.server.errors import APIError
from llumnix_py.server.metrics import Metrics

__all__ = ["APIError", "Metrics", "ServerThread", "create_app", "serve"]
