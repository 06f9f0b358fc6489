"""A loopback HTTP server that answers like kube-apiserver for ``coordination.k8s.io/v1`` Leases
(GET, POST, PUT with resourceVersion conflicts), from the recorded shapes in
``tests/fixtures/k8s/``, and records every request. Several servers may share one
:class:`LeaseStore`, so a test can cut one candidate off the "API" while another still reaches it."""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"
PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"
_ITEM = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases/([^/?]+)$")
_COLLECTION = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases$")
#: metav1.MicroTime on the wire: RFC 3339 with microseconds.
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: dict[str, Any] | None
    status: int
    via: str  # which server (so which candidate) it came through


@dataclass
class LeaseStore:
    """The API server's state: Leases by (namespace, name), a resourceVersion counter, a request log."""

    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    version: int = 48213
    lock: threading.Lock = field(default_factory=threading.Lock)

    def writes(self, status: int | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method in ("POST", "PUT") and status in (None, r.status)]


def _status(name: str, file: str) -> dict[str, Any]:
    """A recorded Status body, about ``name``."""
    body = fixture(file)
    body["message"] = body["message"].replace("kube-scheduler", name)
    body["details"]["name"] = name
    return body


def _check_spec(spec: Any) -> list[str]:
    """What kube-apiserver would refuse in a Lease spec (types, MicroTime format)."""
    if not isinstance(spec, dict):
        return ["spec is not an object"]
    problems = []
    if "holderIdentity" in spec and not isinstance(spec["holderIdentity"], str):
        problems.append("spec.holderIdentity is not a string")
    for key in ("leaseDurationSeconds", "leaseTransitions"):
        if key in spec and not (isinstance(spec[key], int) and spec[key] >= 0):
            problems.append(f"spec.{key} is not a non-negative integer")
    for key in ("acquireTime", "renewTime"):
        if key in spec and not (isinstance(spec[key], str) and MICRO_TIME.match(spec[key])):
            problems.append(f"spec.{key} {spec[key]!r} is not a MicroTime")
    allowed = {"holderIdentity", "leaseDurationSeconds", "acquireTime", "renewTime", "leaseTransitions"}
    problems += [f"unknown field spec.{k}" for k in set(spec) - allowed - {"preferredHolder", "strategy"}]
    return problems


class FakeApiServer:
    """One listening address over a :class:`LeaseStore`; stop it to cut its clients off."""

    def __init__(self, store: LeaseStore, label: str, port: int = 0) -> None:
        self.store = store
        self.label = label
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FakeApiServer:
        store = self.store
        label = self.label

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the store keeps the request log."""

            def _reply(self, status: int, body: dict[str, Any], request: dict[str, Any] | None) -> None:
                with store.lock:
                    store.requests.append(Request(self.command, self.path, request, status, label))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                loaded: dict[str, Any] = json.loads(self.rfile.read(length) or b"{}")
                return loaded

            def do_GET(self) -> None:
                found = _ITEM.match(self.path.split("?", 1)[0])
                if not found:
                    self._reply(404, _status(self.path, "status-not-found.json"), None)
                    return
                ns, name = found.groups()
                with store.lock:
                    lease = copy.deepcopy(store.leases.get((ns, name)))
                if lease is None:
                    self._reply(404, _status(name, "status-not-found.json"), None)
                else:
                    self._reply(200, lease, None)

            def do_POST(self) -> None:
                found = _COLLECTION.match(self.path.split("?", 1)[0])
                body = self._body()
                if not found:
                    self._reply(404, _status(self.path, "status-not-found.json"), body)
                    return
                (ns,) = found.groups()
                name = (body.get("metadata") or {}).get("name", "")
                problems = _check_spec(body.get("spec"))
                with store.lock:
                    store.problems.extend(problems)
                    exists = (ns, name) in store.leases
                    if not problems and not exists:
                        store.version += 1
                        lease = fixture("lease.json")
                        lease["metadata"].update(
                            name=name, namespace=ns, uid=str(uuid.uuid4()), resourceVersion=str(store.version)
                        )
                        lease["spec"] = body["spec"]
                        store.leases[(ns, name)] = lease
                if problems:
                    self._reply(HTTPStatus.UNPROCESSABLE_ENTITY, {"kind": "Status", "code": 422}, body)
                elif exists:
                    self._reply(409, _status(name, "status-already-exists.json"), body)
                else:
                    self._reply(201, copy.deepcopy(lease), body)

            def do_PUT(self) -> None:
                found = _ITEM.match(self.path.split("?", 1)[0])
                body = self._body()
                if not found:
                    self._reply(404, _status(self.path, "status-not-found.json"), body)
                    return
                ns, name = found.groups()
                problems = _check_spec(body.get("spec"))
                status = 200
                with store.lock:
                    store.problems.extend(problems)
                    current = store.leases.get((ns, name))
                    sent = (body.get("metadata") or {}).get("resourceVersion")
                    if problems:
                        status = HTTPStatus.UNPROCESSABLE_ENTITY
                    elif current is None:
                        status = 404
                    elif sent != current["metadata"]["resourceVersion"]:
                        status = 409  # optimistic concurrency: someone wrote it since this client read it
                    else:
                        store.version += 1
                        current["metadata"]["resourceVersion"] = str(store.version)
                        current["spec"] = body["spec"]
                        reply = copy.deepcopy(current)
                if status == 200:
                    self._reply(200, reply, body)
                elif status == 409:
                    self._reply(409, _status(name, "status-conflict.json"), body)
                elif status == 404:
                    self._reply(404, _status(name, "status-not-found.json"), body)
                else:
                    self._reply(status, {"kind": "Status", "code": int(status)}, body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-k8s-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the port stays this server's, for :meth:`start` again)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
