"""``python -m ntspy``: the same as the ``ntspy`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
