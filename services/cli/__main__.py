"""``python -m services.cli`` is the ``tessera`` command (how child processes are started)."""

import sys

from services.cli.main import main

sys.exit(main())
