"""``uvicorn service.main:app``: the API configured from the environment (IGAT_*)."""

from service.app import create_app

app = create_app()
