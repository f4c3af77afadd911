"""The WSGI entry point: ``asyncwsgi serve tests.djangoproject.wsgi:application``."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djangoproject.settings")

application = get_wsgi_application()
