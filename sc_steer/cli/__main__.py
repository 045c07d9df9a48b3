"""``python -m sc_steer.cli``: the same command line as the ``sc-steer`` script."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
