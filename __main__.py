"""``python -m tbps``."""

from tbps.cli import main

main()
