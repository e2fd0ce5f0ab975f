"""`python -m ds4c`: the `ds4c` command (the REPL, or pipe mode with -p)."""

import sys

from .repl import main

sys.exit(main())
