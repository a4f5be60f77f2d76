"""`python -m zinfer ...`: the same command line as `zinfer ...`."""

import sys

from zinfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
