"""The ``deit`` command line (see ``deit --help``); ``main`` is the console script's entry point."""

from deit.cli.main import build_parser, main
from deit.cli.train import train_config_from_args

__all__ = ["build_parser", "main", "train_config_from_args"]
