"""Settings for ``manage.py runserver`` through ``asyncwsgi.contrib.django``: DEBUG, staticfiles.

Module names are relative to this package, so a copy of the project under another name (the
autoreload test edits one) runs as it is.
"""

from __future__ import annotations

from pathlib import Path

from .settings import *  # noqa: F403

DEBUG = True
ROOT_URLCONF = f"{__package__}.urls"
WSGI_APPLICATION = f"{__package__}.wsgi.application"
INSTALLED_APPS = ["asyncwsgi.contrib.django", "django.contrib.staticfiles"]
STATIC_URL = "static/"
STATICFILES_DIRS = [Path(__file__).resolve().parent / "static"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "DEBUG"}},
    "loggers": {
        "django.security.csrf": {"level": "ERROR"},
        "django.request": {"level": "ERROR"},
        # "File ... first seen with mtime ...": the test edits a file only once the autoreloader
        # has recorded it, and waits for "... changed, reloading.".
        "django.utils.autoreload": {"level": "DEBUG", "handlers": ["stderr"], "propagate": False},
    },
}
