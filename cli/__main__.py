"""`python -m cli ...` is the `taps` console script."""

import sys

from cli.main import main

sys.exit(main())
