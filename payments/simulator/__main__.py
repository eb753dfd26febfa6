"""``python -m payments.simulator``: the same command as ``python -m payments simulator``."""

import sys

from ..__main__ import main

main(["simulator", *sys.argv[1:]])
