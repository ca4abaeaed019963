"""`python -m enginekit` runs the command-line interface."""

from enginekit.cli import main

main()
