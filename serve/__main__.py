import sys

from serve.cli import run

sys.exit(run())
