"""`python -m asr.compare [<sweep_id>|latest]`: the name `make compare` and earlier docs use for
`python -m asr.sweep_summary` (a grid's or study's jobs as a table sorted by WER)."""

import sys

from asr import cli
from asr.sweep_summary import main

if __name__ == "__main__":
    sys.exit(cli.run(main))
