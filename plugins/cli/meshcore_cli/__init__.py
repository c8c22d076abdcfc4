"""The ``mesh-llm`` command: the application that loads the core and the installed plugins.

Not a plugin and not part of the core library: a thin typer layer (:mod:`.cli`) over
``NodeConfig`` and ``Node``, and the runner (:mod:`.runner`) that owns signals, the start
banner and exit codes. ``python -m meshcore_cli`` is the same as ``mesh-llm``.
"""
