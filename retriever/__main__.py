"""`python -m retriever` runs the command line."""

from retriever.cli.app import main

main()
