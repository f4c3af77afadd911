"""The version of asyncwsgi, in one place: the package, SERVER_SOFTWARE and the build read it."""

__version__ = "0.1.0"
