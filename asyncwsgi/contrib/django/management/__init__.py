"""Management commands of asyncwsgi.contrib.django."""
