"""``python -m mugs``: the ``mugs`` command, for environments where its script is not on PATH."""

import sys

from mugs.cli import main

if __name__ == "__main__":
    sys.exit(main())
