"""``python -m opd_fast.cli`` (used by ``torchrun ... -m opd_fast.cli train``)."""

import sys

from opd_fast.cli import main

sys.exit(main())
