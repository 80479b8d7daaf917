"""`python -m client`: the command-line client (see client/cli.py)."""

import sys

from .cli import main

sys.exit(main())
