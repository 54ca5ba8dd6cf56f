"""`python -m lorajobs ...` is the `lorajobs` command."""

from lorajobs.cli import main

main()
