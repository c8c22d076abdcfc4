"""``python -m meshcore_cli``: the ``mesh-llm`` command."""

import os
import sys

from meshcore_cli.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
