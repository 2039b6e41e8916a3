"""``python -m edgeguard.cli`` (as with the former single-module CLI); guarded so importing it runs nothing."""

import sys

from edgeguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
