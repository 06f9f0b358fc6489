"""Fixtures for the chart and image tests: the helm binary (fetched once into .cache/tools by
scripts/fetch-helm.sh; a failure to fetch it fails the tests, never skips them) and renders."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tessera"
PRODUCTION = CHART / "examples" / "production.yaml"
RELEASE, NAMESPACE = "rel", "tessera"
#: The base name of the release's objects; each service's are "<FULLNAME_PREFIX>-<service>".
FULLNAME_PREFIX = f"{RELEASE}-tessera"
#: libyaml's loader where PyYAML has it: parsing the renders is most of these tests' time.
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def helm() -> Path:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-helm.sh")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/fetch-helm.sh could not fetch helm:\n{done.stderr}")
    path = ROOT / done.stdout.strip().splitlines()[-1]
    assert path.is_file(), path
    return path


def run_helm(helm: Path, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], cwd=chart, capture_output=True, text=True, timeout=120)


Render = Callable[..., list[Manifest]]


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """``render(*helm template args, chart=...)``: the objects ``helm template`` prints, test hooks included."""

    def _render(*args: str, chart: Path = CHART) -> list[Manifest]:
        done = run_helm(helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *args, chart=chart)
        assert done.returncode == 0, done.stderr
        return [doc for doc in yaml.load_all(done.stdout, Loader=SafeLoader) if doc]

    return _render


@pytest.fixture(scope="session")
def default_objects(render: Render) -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def production_objects(render: Render) -> list[Manifest]:
    return render("-f", str(PRODUCTION))


#: Non-default switches the tests look at, in one render (each render costs a helm run and a parse).
VARIANT = (
    "--set", "services.metrics.enabled=false",
    "--set", "prometheus.podAnnotations=true",
    "--set", "services.identity.autoscaling.enabled=false",
    "--set", "services.identity.replicas=3",
)  # fmt: skip


@pytest.fixture(scope="session")
def variant_objects(render: Render) -> list[Manifest]:
    return render(*VARIANT)


@pytest.fixture(scope="session", autouse=True)
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate reads and parses its schema files (one of them megabytes) for every
    object it checks; the files do not change, so read each once per run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents),
        )
        yield


def of_kind(objects: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def by_name(objects: Sequence[Manifest], kind: str) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, kind)}
