"""`python -m benchmarks [options]`: every benchmark section in one process (see benchmarks.bench)."""

import argparse
import sys

from benchmarks import bench
from surgery.errors import SurgeryError

parser = argparse.ArgumentParser(prog="python -m benchmarks", description=bench.__doc__)
bench.add_arguments(parser)
try:
    sys.exit(bench.run(parser.parse_args()))
except SurgeryError as err:
    print(f"python -m benchmarks: error: {err}", file=sys.stderr)
    sys.exit(2)
