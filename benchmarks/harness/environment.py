"""What a run needs around it: the ``benchmarks/.venv`` virtualenv, wrk and nginx, the open-file
limit, the files the apps serve, free ports, and the servers' environment variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .constants import BENCH_DIR, REPO_ROOT, VENV_DIR


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV_DIR / "bin" / "python"


def requirement_dist(requirement: str) -> str:
    return requirement.split("[", 1)[0].split("=", 1)[0].split(">", 1)[0].strip()


def installed_dists(python: Path | str, names: Sequence[str]) -> dict[str, str | None]:
    """Return ``{dist: version or None}`` as seen by interpreter ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    # Run outside the repository: its asyncwsgi.egg-info would pass for an installed asyncwsgi.
    proc = subprocess.run(
        [str(python), "-c", code, *names],
        capture_output=True,
        text=True,
        check=False,
        cwd=BENCH_DIR / "wrk",
    )
    if proc.returncode != 0:
        return dict.fromkeys(names)
    result: dict[str, str | None] = json.loads(proc.stdout)
    return result


def project_dependencies() -> list[str]:
    """asyncwsgi's own dependencies, from pyproject.toml (a new one reaches an existing venv)."""
    import tomllib

    try:
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return []
    return list(project.get("dependencies", []))


def ensure_venv(requirements: Sequence[str], reinstall: bool) -> bool:
    """Create ``benchmarks/.venv`` if needed and install what is missing; False on failure."""
    requirements = [*requirements, *project_dependencies()]
    python = venv_python()
    if not python.exists():
        log(f"creating virtualenv {VENV_DIR}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            log(f"cannot create the virtualenv ({exc}); using {sys.executable}")
            return False
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    dists = sorted({requirement_dist(r) for r in requirements})
    present = installed_dists(python, dists)
    missing = [r for r in requirements if reinstall or present.get(requirement_dist(r)) is None]
    if "uvicorn[standard]" in requirements and None in (
        installed_dists(python, ["uvloop", "httptools"]).values()
    ):
        missing.append("uvicorn[standard]")
    if missing:
        log(f"installing into {VENV_DIR}: {' '.join(sorted(set(missing)))}")
        proc = subprocess.run([*pip, *sorted(set(missing))], check=False)
        if proc.returncode != 0:
            log("pip install failed; servers that need the missing packages will fail")
    if reinstall or installed_dists(python, ["asyncwsgi"])["asyncwsgi"] is None:
        if (REPO_ROOT / "pyproject.toml").exists():
            log("installing asyncwsgi (editable) from the repository")
            proc = subprocess.run([*pip, "-e", str(REPO_ROOT)], check=False)
            if proc.returncode != 0:
                log("pip install -e of asyncwsgi failed; continuing without it")
        else:
            log("no pyproject.toml at the repository root yet; asyncwsgi is not installed")
    return True


def ensure_system_tools(need_nginx: bool) -> None:
    """Install wrk (and nginx) from Debian packages when they are missing and we are root."""
    wanted = ["wrk"] + (["nginx"] if need_nginx else [])
    missing = [tool for tool in wanted if shutil.which(tool) is None and not nginx_installed(tool)]
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        subprocess.run(install, env=env, check=False, capture_output=True)


def nginx_installed(tool: str) -> bool:
    return tool == "nginx" and Path("/usr/sbin/nginx").exists()


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def raise_nofile_limit() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit; servers and clients inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def bench_file_path() -> str:
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import apps
    finally:
        sys.path.remove(str(BENCH_DIR))
    return apps.bench_file_path()


def static_file(size: int) -> str:
    """A file of ``size`` bytes next to the 10 MiB one, for nginx's body64k/body1m rows."""
    path = Path(bench_file_path()).parent / f"static-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"x" * size)
        tmp.chmod(0o644)
        tmp.replace(path)
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env() -> dict[str, str]:
    paths = [str(BENCH_DIR), str(REPO_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
