"""Index: searching embedded sources, exactly or approximately, one source or a whole DB.

:mod:`~starkret.index.topk` (the Rust top-k and the one exclusion form),
:mod:`~starkret.index.exact` (the exact scan of a source's parts),
:mod:`~starkret.index.ivf`, :mod:`~starkret.index.gpu` (torch devices),
:mod:`~starkret.index.source` (one source's index, opened) and
:mod:`~starkret.index.build` (building it), :mod:`~starkret.index.db` (``ImageDB``:
every source of a DB together) and :mod:`~starkret.index.clipback` (clip back and
faiss indices other tools built).
"""
