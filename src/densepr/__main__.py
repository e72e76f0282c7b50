"""``python -m densepr`` (also what ``torchrun -m densepr train ...`` runs)."""

from .cli import main

main()
