"""``python -m capsa``: the same as the ``capsa`` command."""

import sys

from capsa.cli.main import main

sys.exit(main())
