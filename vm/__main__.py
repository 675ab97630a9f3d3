"""`python -m vm`: the vm command line."""

import sys

from .cli import main

sys.exit(main())
