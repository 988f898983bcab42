"""``python -m rmgl.cli`` (what ``torchrun -m rmgl.cli train ...`` runs)."""

import sys

from rmgl.cli import main

sys.exit(main())
