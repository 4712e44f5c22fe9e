"""Zen vs dense, AGsparse, SparCML-style and OmniReduce-style sync: same as `thrifty zen bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["zen", "bench", *sys.argv[1:]])
