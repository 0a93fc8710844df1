"""``python -m roadxfer``: the single-scene command line (:mod:`roadxfer.cli`)."""

import sys

from .cli import main

sys.exit(main())
