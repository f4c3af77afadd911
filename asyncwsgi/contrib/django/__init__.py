"""A Django app that makes ``python manage.py runserver`` serve through asyncwsgi.

Add it to ``INSTALLED_APPS``, before ``django.contrib.staticfiles`` when that is installed (the
first app that provides a command wins)::

    INSTALLED_APPS = [
        "asyncwsgi.contrib.django",
        "django.contrib.staticfiles",
        ...
    ]

``runserver`` keeps its flags, its system checks, its autoreloader and, with staticfiles, its
static file handling in DEBUG; only the server underneath changes. In production, serve the
project's WSGI application directly: ``asyncwsgi serve mysite.wsgi:application``.
"""
