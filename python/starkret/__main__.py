"""``python -m starkret``: the ``starkret`` command."""

import sys

from starkret.cli.commands import main

sys.exit(main())
