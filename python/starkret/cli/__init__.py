"""The command line: ``starkret <command>`` and ``embed-shards`` (:mod:`~starkret.cli.commands`),
``starkret doctor`` (:mod:`~starkret.cli.doctor`)."""
