"""``python -m neuroexplain`` runs the command-line interface (same as ``neuroexplain``)."""

import sys

from neuroexplain.cli import main

if __name__ == "__main__":
    sys.exit(main())
