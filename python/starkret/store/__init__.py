"""The store: what an embedded source is on disk, and the one way to read it.

Part names (:mod:`~starkret.store.layout`), per-row metadata
(:mod:`~starkret.store.metadata`), key -> row lookups (:mod:`~starkret.store.keyindex`),
the keys already written (:mod:`~starkret.store.keyset`) and the claims and locks of
writers sharing a folder (:mod:`~starkret.store.claims`). Nothing here imports the
stages above it.
"""
