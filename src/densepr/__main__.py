"""``python -m densepr`` (also what ``torchrun -m densepr train ...`` runs)."""

from densepr.cli import main

main()
