"""`python -m mkimage`: the `reflash` command line."""

import sys

from .cli import main

sys.exit(main())
