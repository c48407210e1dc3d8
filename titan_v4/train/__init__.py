"""The training loop and its hooks around torchtitan 0.2.2's Trainer: ``python -m titan_v4.train``,
start-up checks, resume checks, the non-finite guard, clipping, the optimizer, the loss-term line,
metrics and the run log (docs/design.md lists the files; docs/reliability.md what each guards).

This file imports nothing, so that importing one hook does not import torchtitan's Trainer.
"""
