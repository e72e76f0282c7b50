"""``python -m densepr.cli``: the same as ``python -m densepr``."""

from densepr.cli import main

main()
