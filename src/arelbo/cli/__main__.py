"""``python -m arelbo.cli``: the ``arelbo`` command (used by studies that run training and evaluation as
subprocesses)."""

import sys

from arelbo.cli import main

sys.exit(main())
