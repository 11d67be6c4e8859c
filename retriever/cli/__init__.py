"""The `retriever` command line: commands in `app`, tables and progress in `render`."""

from retriever.cli.app import app, main

__all__ = ["app", "main"]
