"""The `mitp` command line (`python -m peft_mitp.cli`); it lives in `peft_mitp_cli`, which imports torch lazily.

`mitp` itself runs `peft_mitp_cli.main`, so `mitp --help` answers without importing this package (whose import
registers MITP with peft and takes seconds).
"""

import sys

from peft_mitp_cli import OFFLINE_BACKBONE, TrainOptions, build_parser, main, options_from_args, read_config_file

__all__ = ["OFFLINE_BACKBONE", "TrainOptions", "build_parser", "main", "options_from_args", "read_config_file"]

if __name__ == "__main__":
    sys.exit(main())
