"""Stage subcommands (pretrain, search, finetune, deploy, evaluate) of the `pas` CLI."""
from __future__ import annotations


def add_subcommands(sub) -> None:
    """Register the stage subcommands on the CLI's subparsers."""
