"""`python -m benchmarks [options]`: same as `surgery bench`."""

import argparse
import sys

from surgery.commands import bench

parser = argparse.ArgumentParser(prog="python -m benchmarks", description=bench.__doc__)
bench.add_arguments(parser)
sys.exit(bench.run(parser.parse_args()))
