"""The server tier: the only importer of Flask and cheroot. ``create_app(backend, ...)`` and the
HTTP server under it, with the chat page's files in ``web/``.
"""
