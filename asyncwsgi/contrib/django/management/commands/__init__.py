"""``runserver``, served by asyncwsgi."""
