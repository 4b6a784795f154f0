"""`python -m candle_ckpt ...`: the `candle-ckpt` command line (see `candle_ckpt.operator.cli`)."""

import sys

from .operator.cli import main

sys.exit(main())
