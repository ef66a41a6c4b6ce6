"""`python -m megalong.cli ...`: the `megalong` command."""
import sys

from megalong.cli import main

sys.exit(main())
