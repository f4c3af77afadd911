"""URLs of the test Django project."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]
from django.views.decorators.csrf import csrf_exempt  # type: ignore[import-untyped]

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("form/", views.form, name="form"),
    path("upload/", csrf_exempt(views.upload), name="upload"),
    path("file/", views.large_file, name="file"),
]
