"""``python -m service ...``: the `igat` program (core commands and service commands), as ``igat ...``."""

from service.cli import igat_app

igat_app()(prog_name="python -m service")
