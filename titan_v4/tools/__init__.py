"""Command-line tools around the model and the trainer: `python -m titan_v4.tools.<name> --help`."""
