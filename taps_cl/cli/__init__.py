"""The `taps-cl` command line and the demo: thin wrappers over the library.

May import anything below it (the engine, storage, tracking, the integrations). Nothing in the
library imports the CLI: a command is a few lines that parse, call the library and print.
"""

from taps_cl.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
