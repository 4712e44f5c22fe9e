"""Collectives vs message size, alpha-beta fit: same as `thrifty bench collectives`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["bench", "collectives", *sys.argv[1:]])
