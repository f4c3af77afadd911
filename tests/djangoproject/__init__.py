"""A minimal Django project served by asyncwsgi in the integration tests."""
