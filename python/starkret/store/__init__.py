"""The store: what an embedded source is on disk, and the one way to read it.

Part names (:mod:`~starkret.store.layout`), per-row metadata
(:mod:`~starkret.store.metadata`), key -> row lookups (:mod:`~starkret.store.keyindex`),
the keys already written (:mod:`~starkret.store.keyset`), the claims and locks of
writers sharing a folder (:mod:`~starkret.store.claims`), the guard that lets a command
write only new paths or its own (:mod:`~starkret.store.outputs`) and the one reader of
image bytes from the inputs a source was embedded from (:mod:`~starkret.store.images`).
Nothing here imports the stages above it.
"""
