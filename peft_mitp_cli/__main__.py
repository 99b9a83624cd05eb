"""`python -m peft_mitp_cli` is the `mitp` command."""

import sys

from . import main

sys.exit(main())
