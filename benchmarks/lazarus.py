"""Lazarus recovery vs torchrun restart and Fig. 8 placement: same as `thrifty lazarus bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["lazarus", "bench", *sys.argv[1:]])
