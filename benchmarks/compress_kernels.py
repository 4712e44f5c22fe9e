"""Compressor kernel throughput vs torch.clone: same as `thrifty compress bench-kernels`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["compress", "bench-kernels", *sys.argv[1:]])
