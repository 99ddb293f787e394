"""`python -m abot` runs the CLI (used where the console script is not installed)."""

from abot.cli import main

main()
