"""Marconi's benchmarks, as `thrifty marconi ...`.

python benchmarks/marconi.py                # the paper's ShareGPT sweep (simulate)
python benchmarks/marconi.py serve-trace    # real TTFT of the engine on CPU
python benchmarks/marconi.py simulate --sizes-gb 1,5 --tuner paper
"""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    app(["marconi", *(sys.argv[1:] or ["simulate"])])
