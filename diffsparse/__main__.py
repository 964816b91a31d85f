"""`python -m diffsparse ...`: the `diffsparse` command."""

import sys

from .cli import main

sys.exit(main())
