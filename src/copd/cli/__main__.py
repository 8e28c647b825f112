"""`python -m copd.cli`: the same as the `copd` command."""

import sys

from copd.cli.main import main

sys.exit(main())
