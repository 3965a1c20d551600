"""Serve: an ImageDB as an HTTP service (``starkret serve``).

:mod:`~starkret.serve.app` (the FastAPI application and ``serve``),
:mod:`~starkret.serve.schema` (limits, settings, request and response bodies),
:mod:`~starkret.serve.batcher` (micro-batching), :mod:`~starkret.serve.conversations`
(what each conversation was shown) and :mod:`~starkret.serve.middleware` (body limit,
statistics). ``GET /image`` reads through :meth:`~starkret.index.db.ImageDB.image_bytes`.
"""
