"""``python -m transinv`` (and ``torchrun -m transinv``) run the CLI."""

from .cli import main

main()
