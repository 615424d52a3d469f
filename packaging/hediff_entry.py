"""Entry point for frozen bundles: the same `hediff` command; with no arguments it opens the desktop app."""

import sys

from hediff.desktop.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["gui"]))
