"""``python -m tokopt`` is the ``tokopt`` command."""

from tokopt.cli import main

main()
