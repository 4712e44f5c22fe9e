"""Lazarus recovery vs restarts, Fig. 8 placement, placement scaling: `thrifty lazarus bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["lazarus", "bench", *sys.argv[1:]])
