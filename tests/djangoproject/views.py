"""Views of the test Django project."""

from __future__ import annotations

import hashlib
import os

from django.conf import settings  # type: ignore[import-untyped]
from django.http import (  # type: ignore[import-untyped]
    FileResponse,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
)
from django.middleware.csrf import get_token  # type: ignore[import-untyped]
from django.urls import reverse  # type: ignore[import-untyped]


def index(request: HttpRequest) -> HttpResponse:
    """Plain text naming the path as Django sees it and a reversed URL (uses SCRIPT_NAME)."""
    return HttpResponse(
        f"Hello from Django path={request.path} form={reverse('form')}",
        content_type="text/plain",
    )


def form(request: HttpRequest) -> HttpResponse:
    """GET: a CSRF token (and its cookie); POST: the submitted fields, CSRF-checked."""
    if request.method == "GET":
        return JsonResponse({"csrf_token": get_token(request)})
    if request.method == "POST":
        return JsonResponse(
            {
                "name": request.POST.get("name", ""),
                "colours": request.POST.getlist("colour"),
            }
        )
    return HttpResponseNotAllowed(["GET", "POST"])


def upload(request: HttpRequest) -> HttpResponse:
    """POST multipart: the size and SHA-256 of the uploaded ``data`` file (CSRF exempt)."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    uploaded = request.FILES["data"]
    digest = hashlib.sha256()
    for chunk in uploaded.chunks():
        digest.update(chunk)
    return JsonResponse(
        {"size": uploaded.size, "sha256": digest.hexdigest(), "label": request.POST.get("label")}
    )


def large_file(request: HttpRequest) -> FileResponse:
    """A FileResponse of the file named by ``settings.LARGE_FILE_ENV``."""
    path = os.environ[settings.LARGE_FILE_ENV]
    return FileResponse(open(path, "rb"), content_type="application/octet-stream")
