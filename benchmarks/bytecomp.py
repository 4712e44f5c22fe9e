"""ByteComp vs best uniform strategy vs MergeComp vs DDP: same as `thrifty bytecomp bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["bytecomp", "bench", *sys.argv[1:]])
