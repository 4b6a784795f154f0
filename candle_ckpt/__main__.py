"""`python -m candle_ckpt ...`: the `candle-ckpt` command line (see `candle_ckpt.cli`)."""

import sys

from .cli import main

sys.exit(main())
