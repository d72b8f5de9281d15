"""``python -m service serve|migrate|submit|status|results|cancel`` (the same commands as ``igat ...``)."""

from service.cli import make_app

make_app()(prog_name="python -m service")
