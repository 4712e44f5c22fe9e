"""MergeComp vs layer-wise vs whole-model vs DDP: same as `thrifty mergecomp bench`."""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["mergecomp", "bench", *sys.argv[1:]])
