"""`python -m timl ...` is the `timl` command (timl.cli), for launchers that start a module on every process."""

import sys

from timl.cli import main

sys.exit(main())
