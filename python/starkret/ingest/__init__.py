"""Ingest: image collections to CLIP embeddings in the store's layout.

Reading inputs (:mod:`~starkret.ingest.shards`, :mod:`~starkret.ingest.sources`),
bit-exact CLIP preprocessing (:mod:`~starkret.ingest.preprocess`), the towers
(:mod:`~starkret.ingest.towers`; their weights: :mod:`~starkret.ingest.weights`), and
the embed run: :mod:`~starkret.ingest.embed` plans it, :mod:`~starkret.ingest.pipeline`
does the part work, and :mod:`~starkret.ingest.localworkers` /
:mod:`~starkret.ingest.distributed` spread it over devices and machines.
"""
