#!/usr/bin/env python
"""``python manage.py runserver`` for the test project, served by asyncwsgi.contrib.django.

The project is imported as a top-level package named after its directory, so a copy of this
directory elsewhere works the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", f"{here.name}.settings_runserver")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
