"""Compressed training vs DDP and DDP + powerSGD_hook: same as `thrifty compress bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["compress", "bench", *sys.argv[1:]])
