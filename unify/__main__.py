"""`python -m unify ...`: the same command as `unify ...`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
