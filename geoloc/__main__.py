"""`python -m geoloc COMMAND ...` is `geoloc COMMAND ...` (for environments without the console script)."""

import sys

from .cli import main

sys.exit(main())
