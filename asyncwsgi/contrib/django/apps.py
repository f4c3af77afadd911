"""The Django app configuration of :mod:`asyncwsgi.contrib.django`."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class AsyncWSGIConfig(AppConfig):  # type: ignore[misc]
    """``asyncwsgi.contrib.django``: provides the ``runserver`` command; no models."""

    name = "asyncwsgi.contrib.django"
    label = "asyncwsgi"
    verbose_name = "asyncwsgi"
