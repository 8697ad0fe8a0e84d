"""``python -m fastpipe``: the command line of ``fastpipe._cli.main``."""

import sys

from fastpipe._cli.main import main

if __name__ == "__main__":
    sys.exit(main())
