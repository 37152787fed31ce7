import os
import sys

from serve.cli import run

code = run()
sys.stdout.flush()
sys.stderr.flush()
# No interpreter teardown: with torch and diffusers loaded it takes seconds (8 s measured on a busy 2-core
# box), and SIGTERM to exit must fit Docker's 10 s grace. Everything the CLI started is stopped by now.
os._exit(code)
