"""Command-line tools: python -m titan_v4.tools.<name>."""
