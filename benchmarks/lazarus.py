"""Lazarus's benchmarks, as `thrifty lazarus ...`.

python benchmarks/lazarus.py                # recovery vs restarts, Fig. 8 placement, scaling
python benchmarks/lazarus.py bench-hf       # HF Mixtral: recovery and goodput vs torchrun restart
python benchmarks/lazarus.py bench --repeats 5
"""

import sys

from thrifty.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):  # bare options go to `thrifty lazarus bench`
        args = ["bench", *args]
    app(["lazarus", *args])
