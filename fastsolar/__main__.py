"""`python -m fastsolar ...`: the command line (see fastsolar.cli)."""
import sys

from fastsolar.cli import main

if __name__ == "__main__":
    sys.exit(main())
