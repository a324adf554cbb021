"""`python -m surgery.cli`: the `surgery` command."""

import sys

from surgery.cli.entry import main

sys.exit(main())
