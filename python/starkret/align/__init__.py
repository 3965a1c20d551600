"""Align: one image per image-sharing moment, never reused or near-duplicated.

:mod:`~starkret.align.aligner` (``Aligner``), :mod:`~starkret.align.choice` (the one
alignment rule: over-fetch, the Rust choice, fetch more; the Aligner and the service's
``/align`` both call it), dialogue formats (:mod:`~starkret.align.formats`, Stark's
release conventions in :mod:`~starkret.align.stark`), whole files
(:mod:`~starkret.align.dialogue`), evaluation (:mod:`~starkret.align.eval`) and the
HTML report (:mod:`~starkret.align.report`).
"""
