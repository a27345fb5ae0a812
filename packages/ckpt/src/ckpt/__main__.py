"""``python -m ckpt``: the same as the ``ckpt`` command."""

import sys

from .cli import main

sys.exit(main())
