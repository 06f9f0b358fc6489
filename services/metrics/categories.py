"""Categories: rules over a transcript, and where they matched. Pure, no I/O.

A phrase is matched on whole words of the normalized text (case-folded, accents and punctuation
removed), so "Thank you for calling!" matches "thank you for calling" and "Désolé" matches
"desole". In a phrase, ``*`` inside a word matches any letters, a ``*`` word any one word, and
``{a|b c}`` any of the alternatives. A rule holds when a message of its participant within its
window matches one of its phrases (or, negated, when none does); a category is detected when all
of its rules hold, and the messages that matched are its evidence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from services.core.errors import InvalidArgument, Violation
from tessera.v1 import event_pb2, quality_pb2

MAX_RULES = 20
MAX_PHRASES = 100
MAX_PHRASE = 200
_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PARTICIPANT_AUTHOR = {
    quality_pb2.PARTICIPANT_CUSTOMER: event_pb2.AUTHOR_CUSTOMER,
    quality_pb2.PARTICIPANT_AGENT: event_pb2.AUTHOR_AGENT,
    quality_pb2.PARTICIPANT_BOT: event_pb2.AUTHOR_BOT,
}
_PARTICIPANT_NAME = {0: "anyone", 1: "customer", 2: "agent", 3: "bot"}


_WORDS = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Case-folded, accents stripped, every run of non-word characters one space."""
    if text.isascii():  # most transcripts: no accents to strip
        return " ".join(_WORDS.findall(text.lower()))
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_WORDS.findall(bare))


def _token(word: str) -> str:
    """One word of a phrase: ``*`` alone is any one word; inside a word, any letters."""
    if word == "*":
        return r"\w+"
    pieces = [re.escape(normalize(piece)).replace(r"\ ", " ") for piece in word.split("*")]
    return r"\w*".join(pieces) if any(pieces) else ""


def _words(text: str) -> str:
    return " ".join(t for t in (_token(tok) for tok in text.split()) if t)


@lru_cache(maxsize=4096)
def compile_phrase(phrase: str) -> re.Pattern[str]:
    """The phrase as a regular expression over normalized text (whole words only)."""
    parts: list[str] = []
    for m in re.finditer(r"\{([^{}]*)\}|[^\s{}]+", phrase):
        if m.group(1) is not None:
            options = [_words(o) for o in m.group(1).split("|")]
            parts.append("(?:" + "|".join(o for o in options if o) + ")")
        else:
            word = _words(m.group(0))
            if word:
                parts.append(word)
    return re.compile(r"(?<!\w)" + " ".join(parts) + r"(?!\w)")


@dataclass(frozen=True)
class Line:
    """One message of a transcript, as the rules see it."""

    event_id: str
    author: int
    text: str
    #: Seconds from the interaction's start.
    offset: float

    @cached_property
    def normalized(self) -> str:
        """Normalized once, however many rules read the line."""
        return normalize(self.text)


@dataclass(frozen=True)
class Hit:
    event_id: str
    phrase: str
    excerpt: str
    offset: float
    author: int
    #: The words of the message that matched (``phrase`` may be a pattern such as "{late|delayed}").
    matched: str = ""

    @property
    def said(self) -> str:
        """What was said, and the rule's phrase when that was a pattern: 'late' (as '{late|delayed}')."""
        if not self.matched or self.matched == self.phrase:
            return repr(self.phrase)
        return f"{self.matched!r} (as {self.phrase!r})"

    def evidence(self) -> quality_pb2.Evidence:
        """The hit as evaluations and alerts show it."""
        return quality_pb2.Evidence(
            description=f"{participant_name(self.author)} said {self.said}: {self.excerpt}",
            event_id=self.event_id,
            phrase=self.phrase,
            excerpt=self.excerpt,
            offset_seconds=self.offset,
        )


@dataclass(frozen=True)
class Detection:
    detected: bool
    hits: tuple[Hit, ...]
    #: In words, per rule: what held or did not.
    reasons: tuple[str, ...]


def _window(lines: Sequence[Line], rule: quality_pb2.CategoryRule) -> list[Line]:
    w, n = rule.window, rule.window_size
    if w == quality_pb2.TRANSCRIPT_WINDOW_FIRST_MESSAGES:
        return list(lines[: int(n)])
    if w == quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES:
        return list(lines[-int(n) :])
    if w == quality_pb2.TRANSCRIPT_WINDOW_FIRST_SECONDS:
        return [x for x in lines if x.offset <= n]
    if w == quality_pb2.TRANSCRIPT_WINDOW_LAST_SECONDS:
        end = max((x.offset for x in lines), default=0.0)
        return [x for x in lines if x.offset >= end - n]
    return list(lines)


def _window_words(rule: quality_pb2.CategoryRule) -> str:
    n = rule.window_size
    return {
        quality_pb2.TRANSCRIPT_WINDOW_FIRST_MESSAGES: f" in the first {n:g} messages",
        quality_pb2.TRANSCRIPT_WINDOW_LAST_MESSAGES: f" in the last {n:g} messages",
        quality_pb2.TRANSCRIPT_WINDOW_FIRST_SECONDS: f" in the first {n:g} s",
        quality_pb2.TRANSCRIPT_WINDOW_LAST_SECONDS: f" in the last {n:g} s",
    }.get(rule.window, "")


def _excerpt(text: str, start: int, end: int, words: int = 4) -> str:
    before = text[:start].split()[-words:]
    after = text[end:].split()[:words]
    return " ".join([*before, f"[{text[start:end]}]", *after])


@dataclass(frozen=True)
class _Rule:
    """A rule ready to run: its phrases as one expression (group i is phrase i), its texts."""

    author: int | None
    rule: quality_pb2.CategoryRule
    pattern: re.Pattern[str]
    phrases: tuple[str, ...]
    who: str
    where: str


@lru_cache(maxsize=1024)
def _compile(spec: bytes) -> tuple[_Rule, ...]:
    category = quality_pb2.Category()
    category.ParseFromString(spec)
    out = []
    for rule in category.rules:
        phrases = tuple(rule.phrases)
        body = "|".join(f"(?P<p{i}>{compile_phrase(p).pattern})" for i, p in enumerate(phrases))
        out.append(
            _Rule(
                _PARTICIPANT_AUTHOR.get(rule.participant),
                rule,
                re.compile(body),
                phrases,
                _PARTICIPANT_NAME.get(rule.participant, "anyone"),
                _window_words(rule),
            )
        )
    return tuple(out)


def detect(category: quality_pb2.Category, transcript: Sequence[Line]) -> Detection:
    """Whether the category is detected in the transcript, and its evidence. The transcript comes
    in time order (offset, then event id), as the store reads it: first and last N messages
    count in that order. Each matching message is one hit, at its first match."""
    hits: list[Hit] = []
    reasons: list[str] = []
    detected = True
    rules = _compile(category.SerializeToString(deterministic=True))
    for r in rules:
        lines = [x for x in transcript if r.author is None or x.author == r.author]
        found: list[Hit] = []
        for line in _window(lines, r.rule):
            normalized = line.normalized
            m = r.pattern.search(normalized)
            if m:
                phrase = r.phrases[int((m.lastgroup or "p0")[1:])]
                excerpt = _excerpt(normalized, *m.span())
                found.append(Hit(line.event_id, phrase, excerpt, line.offset, line.author, m.group(0)))
        if r.rule.negate:
            holds = not found
            reasons.append(
                f"{r.who} never said any of {list(r.phrases)}{r.where}"
                if holds
                else f"{r.who} said {found[0].said}{r.where}, which the rule forbids"
            )
        else:
            holds = bool(found)
            reasons.append(
                f"{r.who} said {found[0].said}{r.where}"
                if holds
                else f"{r.who} said none of {list(r.phrases)}{r.where}"
            )
        hits.extend(found)
        detected = detected and holds
    return Detection(detected and bool(rules), tuple(hits), tuple(reasons))


def validate(category_id: str | None, category: quality_pb2.Category, field: str = "category") -> None:
    """Field violations for a category a tenant defines (the id only when creating)."""
    out: list[Violation] = []
    if category_id is not None and not _ID.match(category_id):
        out.append(Violation("category_id", "lowercase letters, digits and dashes, 1 to 63, not starting with a dash"))
    if len(category.display_name) > 200:
        out.append(Violation(f"{field}.display_name", "at most 200 characters"))
    if not category.rules:
        out.append(Violation(f"{field}.rules", "at least one rule"))
    if len(category.rules) > MAX_RULES:
        out.append(Violation(f"{field}.rules", f"at most {MAX_RULES} rules"))
    for i, rule in enumerate(category.rules):
        p = f"{field}.rules[{i}]"
        if not rule.phrases:
            out.append(Violation(f"{p}.phrases", "at least one phrase"))
        if len(rule.phrases) > MAX_PHRASES:
            out.append(Violation(f"{p}.phrases", f"at most {MAX_PHRASES} phrases"))
        for j, phrase in enumerate(rule.phrases):
            problem = _phrase_problem(phrase)
            if problem:
                out.append(Violation(f"{p}.phrases[{j}]", problem))
        if rule.participant not in _PARTICIPANT_NAME:
            out.append(Violation(f"{p}.participant", f"unknown participant {rule.participant}"))
        if rule.window not in quality_pb2.TranscriptWindow.values():
            out.append(Violation(f"{p}.window", f"unknown window {rule.window}"))
        elif rule.window != quality_pb2.TRANSCRIPT_WINDOW_UNSPECIFIED and not (1 <= rule.window_size <= 86_400):
            out.append(Violation(f"{p}.window_size", "from 1 to 86,400 messages or seconds for this window"))
        elif rule.window == quality_pb2.TRANSCRIPT_WINDOW_UNSPECIFIED and rule.window_size:
            out.append(Violation(f"{p}.window_size", "only with a first or last window"))
    if out:
        raise InvalidArgument("invalid category", out)


def _phrase_problem(phrase: str) -> str:
    if not phrase.strip():
        return "must not be empty"
    if len(phrase) > MAX_PHRASE:
        return f"at most {MAX_PHRASE} characters"
    depth = 0
    for c in phrase:
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth not in (0, 1):
            return "braces must pair and not nest: {a|b}"
    if depth:
        return "braces must pair and not nest: {a|b}"
    if not normalize(phrase.replace("*", "")) and "*" not in phrase:
        return "must contain a word"
    if any(not normalize(o) for body in re.findall(r"\{([^{}]*)\}", phrase) for o in body.split("|")):
        return "every alternative in {a|b} must contain a word"
    return ""


_AUTHOR_NAME: dict[int, str] = {
    event_pb2.AUTHOR_CUSTOMER: "customer",
    event_pb2.AUTHOR_AGENT: "agent",
    event_pb2.AUTHOR_BOT: "bot",
}


def participant_name(author: int) -> str:
    return _AUTHOR_NAME.get(author, "someone")
