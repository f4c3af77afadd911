"""Settings of the test Django project: no database, CSRF on, ``DEBUG`` off."""

from __future__ import annotations

SECRET_KEY = "asyncwsgi-tests-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "tests.djangoproject.urls"
WSGI_APPLICATION = "tests.djangoproject.wsgi.application"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES: dict[str, dict[str, str]] = {}
TEMPLATES: list[dict[str, object]] = []
USE_TZ = True
USE_I18N = False
#: The environment variable that names the large file ``/file/`` sends (read per request).
LARGE_FILE_ENV = "ASYNCWSGI_TEST_FILE"
# Uploads larger than this go to a temporary file, so a large upload exercises streaming reads.
FILE_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024 * 1024
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"django.security.csrf": {"level": "ERROR"}, "django.request": {"level": "ERROR"}},
}
