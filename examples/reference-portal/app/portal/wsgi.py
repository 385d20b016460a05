"""The WSGI entry point gunicorn loads: the service named by $PORTAL_SERVICE."""

from .app import create_app

app = create_app()
