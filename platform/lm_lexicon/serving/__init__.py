"""Serving support for the Ray Serve application in ``serve_app/``: API schemas and validation
(:mod:`.schemas`), application arguments and pipeline layout (:mod:`.config`), the per-deployment work as plain
classes (:mod:`.engines`) and an HTTP client (:mod:`.client`). Importing this package loads neither torch nor Ray.
"""
from lm_lexicon.serving.schemas import ApiError, Limits

__all__ = ["ApiError", "Limits"]
