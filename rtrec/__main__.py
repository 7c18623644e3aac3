"""`python -m rtrec` runs the `rtrec` command."""

import sys

from rtrec.cli import main

sys.exit(main())
