"""Zen vs dense, AGsparse, SparCML-style and OmniReduce-style sync: same as `thrifty zen bench`.

python benchmarks/zen.py                      # emulated NICs at 1 and 10 Gbit/s (root)
python benchmarks/zen.py --rates loopback     # plain loopback, no rate limit, no root
"""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["zen", "bench", *sys.argv[1:]])
