"""``python -m meshcore_cli``: the ``mesh-llm`` command.

Guarded: worker processes (``anyio.to_process``, e.g. the rpc cache seeding) import the
parent's ``__main__`` module under another name, and must not start a node themselves.
"""

import os
import sys

from meshcore_cli.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
