"""Serve: an ImageDB as an HTTP service (``starkret serve``).

:mod:`~starkret.serve.app` (the FastAPI application and ``serve``),
:mod:`~starkret.serve.schema` (limits, settings, request and response bodies),
:mod:`~starkret.serve.batcher` (micro-batching), :mod:`~starkret.serve.conversations`
(what each conversation was shown, bounded in bytes), :mod:`~starkret.serve.middleware`
(API key, body limit, statistics) and :mod:`~starkret.serve.connections` (request
deadlines and the connection cap, as a uvicorn protocol subclass);
:mod:`~starkret.serve.clipback` answers clip back's ``/knn-service``. ``GET /image`` reads
through :meth:`~starkret.index.db.ImageDB.image_bytes`.
"""
