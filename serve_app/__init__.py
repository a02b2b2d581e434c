"""Ray Serve application of lm-lexicon (see serve_app/app.py and docs/SERVING.md).

``import_path: serve_app.app:build_app``. Nothing heavy is imported here: Serve imports ``serve_app.app``.
"""


def build_app(args: dict):
    """Lazy alias of :func:`serve_app.app.build_app`."""
    from serve_app.app import build_app as _build

    return _build(args)
