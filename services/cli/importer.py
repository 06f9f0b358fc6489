"""``tessera import FILE``: JSONL or CSV events, streamed through StreamEvents.

JSONL: one Event per line in proto3 JSON (``message_id``, ``timestamp``, ``channel``,
``identifiers``, and one of ``identify``/``track``/``interaction``/``survey_response``/``message``).
Enum values may be written short and lower-case: ``"channel": "web"``.

CSV: one event per row. Columns: ``message_id``, ``timestamp``, ``channel``, ``source``,
``type`` (identify, track, interaction, survey_response, message), ``event`` (a track's
name), ``id.<type>`` for identifiers, ``traits.<name>``, ``properties.<name>``,
``context.<name>``, and ``<payload>.<field>`` such as ``survey_response.score``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

from services.cli.client import StreamIngester, Tally, batches_of
from tessera.v1 import event_pb2

ENUM_FIELDS: dict[tuple[str, ...], str] = {
    ("channel",): "CHANNEL_",
    ("interaction", "direction"): "DIRECTION_",
    ("interaction", "case_status"): "CASE_STATUS_",
    ("survey_response", "type"): "SURVEY_TYPE_",
    ("message", "author"): "AUTHOR_",
}
PAYLOADS = ("identify", "track", "interaction", "survey_response", "message")


@dataclass(frozen=True)
class ParseFailure:
    line: int
    reason: str


@dataclass
class ImportReport:
    tally: Tally
    parse_failures: list[ParseFailure] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.tally.rejected + len(self.parse_failures)

    def rejection_lines(self, limit: int = 10) -> list[str]:
        """The first rejections, with the line they came from and every reason."""
        out = [f"line {f.line}: {f.reason}" for f in self.parse_failures]
        for key, result in self.tally.rejections:
            lines: list[int] = key  # type: ignore[assignment]
            reasons = "; ".join(f"{v.field.split('.', 1)[-1]}: {v.description}" for v in result.violations)
            out.append(f"line {lines[result.index]} ({result.message_id or 'no message_id'}): {reasons}")
        for key, message in self.tally.refused:
            out.append(f"lines {key[0]}-{key[-1]}: batch refused: {message}")  # type: ignore[index]
        out.sort(key=lambda s: int(s.split()[1].split("-")[0].rstrip(":")))
        return out[:limit]


def normalize_enums(obj: dict[str, Any]) -> dict[str, Any]:
    """Accept ``"web"`` for ``"CHANNEL_WEB"`` and the like, so hand-written files stay readable."""
    for path, prefix in ENUM_FIELDS.items():
        parent: Any = obj
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(path[-1]), str):
            value = parent[path[-1]].strip()
            if not value.upper().startswith(prefix):
                value = prefix + value.upper().replace("-", "_").replace(" ", "_")
            parent[path[-1]] = value.upper()
    return obj


def parse_event(obj: dict[str, Any]) -> event_pb2.Event:
    return json_format.ParseDict(normalize_enums(obj), event_pb2.Event(), ignore_unknown_fields=False)


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _scalar(raw: str) -> Any:
    """CSV cells are text; numbers and booleans in free-form structs become JSON values."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def csv_row_to_dict(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    identifiers = []
    kind = (row.get("type") or "").strip().lower()
    if kind and kind not in PAYLOADS:
        raise ValueError(f"type must be one of {', '.join(PAYLOADS)}, got {kind!r}")
    for raw_column, raw in row.items():
        if raw_column is None or raw is None or raw == "":
            continue
        column = raw_column.strip()
        if column in ("message_id", "timestamp", "channel", "source"):
            out[column] = raw
        elif column == "type":
            continue
        elif column == "event":
            _set_path(out, "track.event", raw)
        elif column.startswith("id."):
            identifiers.append({"type": column[3:], "value": raw})
        elif column.startswith("traits."):
            _set_path(out, "identify.traits." + column[7:], _scalar(raw))
        elif column.startswith(("properties.", "context.")):
            _set_path(out, column, _scalar(raw))
        elif column.split(".", 1)[0] in PAYLOADS:
            _set_path(out, column, raw)
        else:
            raise ValueError(f"unknown column {column!r}")
    if identifiers:
        out["identifiers"] = identifiers
    if kind and kind not in out:
        out[kind] = {}
    return out


def read_events(fp: TextIO, fmt: str, failures: list[ParseFailure]) -> Iterator[tuple[int, event_pb2.Event]]:
    """(line number, event) for every parseable record; failures are collected, not fatal."""
    if fmt == "csv":
        reader = csv.DictReader(fp)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                failures.append(ParseFailure(reader.line_num + 1, "not UTF-8 text; the rest of the file was skipped"))
                return
            line = reader.line_num
            try:
                yield line, parse_event(csv_row_to_dict(row))
            except (ValueError, json_format.ParseError) as exc:
                failures.append(ParseFailure(line, str(exc)))
    raw = fp.buffer if isinstance(fp, io.TextIOWrapper) else None
    lines: Iterator[str | bytes] = iter(raw) if raw is not None else iter(fp)
    for line, chunk in enumerate(lines, start=1):
        try:
            text = chunk.decode("utf-8") if isinstance(chunk, bytes) else chunk
        except UnicodeDecodeError:
            failures.append(ParseFailure(line, "not UTF-8 text"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("each line must be a JSON object")
            yield line, parse_event(obj)
        except (ValueError, json_format.ParseError) as exc:
            failures.append(ParseFailure(line, str(exc)))


def detect_format(path: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    return "csv" if path.suffix.lower() == ".csv" else "jsonl"


def import_file(
    path: Path,
    ingester: StreamIngester,
    *,
    fmt: str | None = None,
    batch_size: int = 200,
    progress: bool = True,
) -> ImportReport:
    from tqdm import tqdm

    fmt = detect_format(path, fmt)
    failures: list[ParseFailure] = []
    total = path.stat().st_size
    with (
        path.open("rb") as raw,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"import {path.name}", disable=not progress) as bar,
    ):
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="" if fmt == "csv" else None)
        numbered = read_events(text, fmt, failures)
        last_pos = [0]

        def keyed() -> Iterator[tuple[object, list[event_pb2.Event]]]:
            pending: list[tuple[int, event_pb2.Event]] = []
            for item in numbered:
                pending.append(item)
                if len(pending) >= batch_size:
                    yield from _cut(pending, batch_size)
                    pending = []
            if pending:
                yield from _cut(pending, batch_size)

        def on_result(_key: object, _resp: object) -> None:
            pos = raw.tell()
            bar.update(max(0, pos - last_pos[0]))
            last_pos[0] = pos

        tally = ingester.send(keyed(), on_result)
        bar.update(max(0, total - last_pos[0]))
    return ImportReport(tally, failures)


def _cut(pending: list[tuple[int, event_pb2.Event]], size: int) -> Iterator[tuple[object, list[event_pb2.Event]]]:
    events = [ev for _, ev in pending]
    lines = [line for line, _ in pending]
    start = 0
    for batch in batches_of(events, size=size):
        yield lines[start : start + len(batch)], batch
        start += len(batch)
