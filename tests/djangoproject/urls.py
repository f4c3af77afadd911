"""URLs of the test Django project."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("form/", views.form, name="form"),
    path("upload/", views.upload, name="upload"),
    path("file/", views.large_file, name="file"),
]
