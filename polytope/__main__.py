"""``python -m polytope``: the ``polytope`` command."""

import sys

from polytope.commands.main import main

sys.exit(main())
