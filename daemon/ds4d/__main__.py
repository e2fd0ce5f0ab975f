"""`python -m ds4d` is the `ds4d` command."""

import sys

from .cli import main

sys.exit(main())
