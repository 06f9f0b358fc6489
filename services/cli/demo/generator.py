"""Seeded, deterministic generator of the demo dataset, and its public API: `generate` and `to_jsonl`.

`tessera up` loads the dataset through the public ingest API, tests assert on it and benchmarks
replay it, so it must be realistic enough to exercise every part of the pipeline (identity stitching
across channels, phone/email normalization, blocked placeholder values,
AHT/FCR/NPS/CSAT/CES/sentiment) while being reproducible: all randomness flows from one
``random.Random(seed)`` and every id is derived from it or from a counter, never from ``uuid4`` or
the clock (except the default ``now``). Equal arguments give equal events, byte-identical under
deterministic serialization and in `to_jsonl` output. This module holds the logic (the synthetic
customer, contact legs, sampling helpers and the `_Generator` that emits every channel); the data
it draws from is in `vocabulary` and `conversations`, the showcase person in `persona`. US phone
numbers use the 555 exchange, so none belongs to a real person.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, TextIO, TypeAlias

from google.protobuf import json_format

from services.cli.demo.conversations import (
    ABANDON_LINES,
    AGENT_ASKS,
    AGENT_CLOSINGS,
    AGENT_GREETINGS,
    AGENT_TRANSFERS,
    BOT_GREETINGS,
    BOT_HANDOFFS,
    CLOSING_NEGATIVE,
    CLOSING_NEUTRAL,
    CLOSING_POSITIVE,
    COMMENTS_NEGATIVE,
    COMMENTS_NEUTRAL,
    COMMENTS_POSITIVE,
    CUSTOMER_DETAILS,
    EMAIL_CAMPAIGNS,
    FRUSTRATED,
    OPENERS,
    RESOLUTIONS,
    SMS_CAMPAIGNS,
    SOCIAL_NEGATIVE,
    SOCIAL_NEUTRAL,
    SOCIAL_POSITIVE,
    SOCIAL_REPLIES,
    UNRESOLVED,
)
from services.cli.demo.persona import PERSONA
from services.cli.demo.vocabulary import (
    ANDROID_DEVICES,
    APP,
    APP_VERSIONS,
    CES_BAD,
    CES_GOOD,
    CHAT,
    CITIES,
    CONTACT_HOURS,
    CSAT_BAD,
    CSAT_GOOD,
    DIGITAL_HOURS,
    EMAIL,
    EMAIL_DOMAINS,
    FIRST_NAMES,
    IOS_DEVICES,
    IP_PREFIXES,
    JUNK_IDS,
    LAST_NAMES,
    LOCALES,
    NICKNAMES,
    NPS_BAD,
    NPS_GOOD,
    NPS_RELATIONSHIP,
    OTHER,
    PAGES,
    PRODUCTS,
    QUEUES,
    REASONS,
    REFERRERS,
    RESOLVED_DISPOSITIONS,
    SHOP_URL,
    SMS,
    SOCIAL,
    STORE,
    STORES,
    STREET_SUFFIXES,
    STREETS,
    SURVEY_DIGITAL_CSAT,
    SURVEY_POSTCALL_CES,
    SURVEY_POSTCALL_NPS,
    SURVEY_RELATIONSHIP_NPS,
    TRANSFER_TO,
    UNRESOLVED_DISPOSITIONS,
    USER_AGENTS,
    VOICE,
    WEB,
    Channel,
)
from tessera.v1 import event_pb2

__all__ = ["generate", "to_jsonl"]

Ids: TypeAlias = list[tuple[str, str]]
Json: TypeAlias = dict[str, Any]

DAY: Final = 86_400
HOUR: Final = 3_600
# Share of events that carry a placeholder identifier a resolver must block.
JUNK_RATE: Final = 0.01


@dataclass(slots=True)
class _Customer:
    """What the generator knows about one synthetic person; never emitted as such."""

    first_name: str
    last_name: str
    email: str
    phone: str  # E.164
    dob: str
    street_no: int
    street: str
    suffix: tuple[str, str]
    unit: str
    city: str
    state: str
    postcode: str
    activity: float
    locale: str
    user_agent: str
    ip: str
    user_id: str = ""
    anonymous_ids: list[str] = field(default_factory=list)
    device_id: str = ""
    platform: str = ""
    device: tuple[str, str] = ("", "")
    app_version: str = ""
    chat_id: str = ""
    loyalty_id: str = ""
    crm_id: str = ""
    social_handle: str = ""
    email_opt_in: bool = False
    sms_opt_in: bool = False
    service_rate: float = 0.0
    home_store: str = ""
    orders: list[tuple[str, str, float]] = field(default_factory=list)  # (order_id, product, amount)


@dataclass(slots=True)
class _Leg:
    """One agent leg (or the abandoned remainder) of a planned contact.

    Time conventions, so durations and timestamps agree exactly: the event ``timestamp`` is when the
    contact arrived in the queue (``arrival``), ``started_at`` is ``wait_seconds`` later (when an agent
    picked it up), and ``ended_at - started_at == talk_seconds + hold_seconds``. After-contact work
    follows ``ended_at``. An abandoned contact has no agent, zero talk and hold, and
    ``started_at == ended_at`` at the moment the customer gave up.
    """

    arrival: int
    wait: int
    talk: int
    hold: int
    acw: int
    queue: str
    agent: str
    disposition: str
    transferred: bool = False
    leg_id: str = ""

    @property
    def started(self) -> int:
        return self.arrival + self.wait

    @property
    def ended(self) -> int:
        return self.started + self.talk + self.hold


def _ascii(text: str) -> str:
    """Fold a name to the lower-case ASCII letters an email local part would use."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _lognorm(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """Right-skewed durations, the shape real handle and wait times have."""
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _poisson(rng: random.Random, lam: float) -> int:
    """Poisson counts (Knuth) so activity varies naturally between customers."""
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit = math.exp(-lam)
    k = 0
    p = rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _national(e164: str, style: int) -> str:
    """Format a +1 number the way caller-id, CRM and POS systems variously do, for the normalizer."""
    d = e164[2:]
    area, ex, line = d[:3], d[3:6], d[6:]
    if style == 0:
        return f"({area}) {ex}-{line}"
    if style == 1:
        return f"{area}-{ex}-{line}"
    if style == 2:
        return f"{area}.{ex}.{line}"
    return f"1 {area} {ex} {line}"


@dataclass(frozen=True, slots=True)
class _Via:
    """Where an event comes from: its channel, the sending system and the identifiers it carries."""

    channel: Channel
    source: str
    ids: Ids


class _Generator:
    """Builds the whole dataset in memory, then sorts it; one instance per `generate` call."""

    def __init__(self, seed: int, customers: int, days: int, now_ts: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.n_customers = customers
        self.days = days
        self.now = now_ts
        self.start = now_ts - days * DAY
        # Activity scales sub-linearly with the window so short windows are not absurdly dense.
        self.scale = math.sqrt(days / 90)
        self.out: list[tuple[int, int, event_pb2.Event]] = []
        self.seq = 0
        self.used: set[str] = {
            PERSONA.email,
            PERSONA.phone,
            PERSONA.chat_id,
            PERSONA.loyalty_id,
            PERSONA.user_id,
            PERSONA.anonymous_id,
            PERSONA.crm_id,
        }
        self.case_no = 1_040_000
        self.order_no = 100_000 + self.rng.randrange(100_000)
        self.agents: dict[str, list[str]] = {}
        self.agent_names: dict[str, str] = {}
        n = 0
        for queue, (_, size) in QUEUES.items():
            self.agents[queue] = []
            for _ in range(size):
                agent_id = f"agt-{101 + n:03d}"
                self.agents[queue].append(agent_id)
                self.agent_names[agent_id] = FIRST_NAMES[(n * 7 + 3) % len(FIRST_NAMES)]
                n += 1
        self.reason_names = list(REASONS)
        self.reason_weights = [w for _, w in REASONS.values()]
        self.email_campaigns = self._campaigns(EMAIL_CAMPAIGNS, max(2, round(10 * self.scale)))
        self.sms_campaigns = self._campaigns(SMS_CAMPAIGNS, max(1, round(4 * self.scale)))

    # ---- primitives ------------------------------------------------------------------------------

    def unique(self, make: Callable[[], str]) -> str:
        """Draw ids until one is unused, so ids never collide within a dataset."""
        while True:
            value = make()
            if value not in self.used:
                self.used.add(value)
                return value

    def uuid(self) -> str:
        """A v4-shaped UUID from the seeded generator (uuid4() would break reproducibility)."""
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def when(self, hours: Sequence[float], margin: int, weekend: float = 1.0) -> int:
        """A time in the window, at least `margin` seconds before now, shaped by hour of day."""
        rng = self.rng
        hi = max(self.start, self.now - margin)
        while True:
            ts = rng.randint(self.start, hi)
            local = ts - 5 * HOUR
            weight = hours[(local // HOUR) % 24]
            if weekend != 1.0 and (local // DAY + 3) % 7 >= 5:
                weight *= weekend
            if rng.random() < weight:
                return ts

    def emit(
        self, ts: int, via: _Via, *, props: Json | None = None, ctx: Json | None = None, junk: bool = True
    ) -> event_pb2.Event:
        """Create an event; it is kept only if it falls in the window (later ones haven't happened)."""
        ev = event_pb2.Event(channel=via.channel, source=via.source)
        ev.timestamp.seconds = ts
        for id_type, value in via.ids:
            ev.identifiers.add(type=id_type, value=value)
        if junk and self.rng.random() < JUNK_RATE:
            id_type, value = self.rng.choice(JUNK_IDS[via.channel])
            ev.identifiers.add(type=id_type, value=value)
        if props:
            ev.properties.update(props)
        if ctx:
            ev.context.update(ctx)
        if self.start <= ts <= self.now:
            self.out.append((ts, self.seq, ev))
            self.seq += 1
        return ev

    def track(
        self,
        ts: int,
        via: _Via,
        name: str,
        props: Json | None = None,
        ctx: Json | None = None,
        *,
        junk: bool = True,
    ) -> None:
        """Emit a Track event."""
        self.emit(ts, via, props=props, ctx=ctx, junk=junk).track.event = name

    def identify(self, ts: int, via: _Via, traits: Json, ctx: Json | None = None, *, junk: bool = True) -> None:
        """Emit an Identify event."""
        self.emit(ts, via, ctx=ctx, junk=junk).identify.traits.update(traits)

    def message(
        self,
        ts: int,
        via: _Via,
        interaction_id: str,
        author: event_pb2.Author.ValueType,
        text: str,
        *,
        agent: str = "",
        junk: bool = True,
    ) -> None:
        """Emit one conversation utterance."""
        msg = self.emit(ts, via, junk=junk).message
        msg.interaction_id = interaction_id
        msg.author = author
        msg.text = text
        if agent:
            msg.agent_id = agent

    def survey(
        self,
        ts: int,
        via: _Via,
        kind: event_pb2.SurveyType.ValueType,
        score: int,
        survey_id: str,
        *,
        interaction_id: str = "",
        comment: str = "",
        junk: bool = True,
    ) -> None:
        """Emit a survey answer; score is always set explicitly, since 0 is a real NPS answer."""
        sr = self.emit(ts, via, junk=junk).survey_response
        sr.type = kind
        sr.score = score
        sr.survey_id = survey_id
        if interaction_id:
            sr.interaction_id = interaction_id
        if comment:
            sr.comment = comment

    def interaction(
        self,
        leg: _Leg,
        via: _Via,
        interaction_id: str,
        reason: str,
        case_id: str,
        *,
        case_status: event_pb2.CaseStatus.ValueType,
        outbound: bool = False,
        props: Json | None = None,
        junk: bool = True,
    ) -> None:
        """Emit one Interaction leg with timestamps derived from its durations."""
        ix = self.emit(leg.arrival, via, props=props, junk=junk).interaction
        ix.interaction_id = interaction_id
        ix.direction = event_pb2.DIRECTION_OUTBOUND if outbound else event_pb2.DIRECTION_INBOUND
        ix.queue = leg.queue
        ix.reason = reason
        ix.disposition = leg.disposition
        ix.started_at.seconds = leg.started
        ix.ended_at.seconds = leg.ended
        ix.talk_seconds = float(leg.talk)
        ix.hold_seconds = float(leg.hold)
        ix.after_contact_work_seconds = float(leg.acw)
        ix.wait_seconds = float(leg.wait)
        if leg.agent:
            ix.agent_id = leg.agent
            ix.case_id = case_id
            ix.case_status = case_status
        else:
            ix.abandoned = True
        if leg.transferred:
            ix.transferred = True
        if leg.leg_id:
            ix.leg_id = leg.leg_id

    # ---- reference data ----------------------------------------------------------------------------

    def _campaigns(self, pool: Sequence[tuple[str, str]], count: int) -> list[tuple[int, str, str]]:
        """Marketing sends spread over the window: (send time, campaign id, text)."""
        out = []
        for i in range(count):
            text, slug = pool[i % len(pool)]
            ts = self.when(CONTACT_HOURS, HOUR)
            out.append((ts, f"cmp-{slug}-{i + 1:02d}", text))
        return out

    def email_variant(self, email: str) -> str:
        """Mostly the clean address; sometimes capitalised or padded, as forms and CRMs deliver it."""
        r = self.rng.random()
        if r < 0.04:
            local, _, domain = email.partition("@")
            return f"{local.title()}@{domain.capitalize()}"
        if r < 0.06:
            return f" {email} "
        return email

    def phone_variant(self, e164: str, national_share: float) -> str:
        """E.164 most of the time, a national format otherwise."""
        if self.rng.random() < national_share:
            return _national(e164, self.rng.choice((0, 0, 0, 1, 1, 2, 3)))
        return e164

    def product(self) -> tuple[str, str, str, float]:
        """A catalogue item; a few items sell far more than the rest."""
        idx = min(int(self.rng.expovariate(1 / 8)), len(PRODUCTS) - 1)
        return PRODUCTS[(idx * 5) % len(PRODUCTS)]

    def order_id(self) -> str:
        """Increasing order numbers, like a real shop's."""
        self.order_no += self.rng.randint(1, 40)
        return f"HP-{self.order_no:07d}"

    def agent(self, queue: str, exclude: str = "") -> str:
        """An agent skilled for the queue."""
        return self.rng.choice([aid for aid in self.agents[queue] if aid != exclude])

    # ---- people ----------------------------------------------------------------------------------

    def new_customer(self) -> _Customer:
        """Draw one synthetic person with the identifiers each system would know them by."""
        rng = self.rng
        first = rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        city, state, areas, zip_prefix = rng.choice(CITIES)
        fa, la = _ascii(first), _ascii(last)

        def make_email() -> str:
            style = rng.random()
            n = rng.randint(1, 99)
            if style < 0.35:
                local = f"{fa}.{la}"
            elif style < 0.55:
                local = f"{fa}{la}{n}"
            elif style < 0.7:
                local = f"{fa[0]}{la}"
            elif style < 0.85:
                local = f"{fa}_{la}{n}"
            else:
                local = f"{fa}{la[:1]}{rng.randint(1960, 2006)}"
            if rng.random() < 0.3:
                local = f"{local}{n}"
            return f"{local}@{rng.choice(EMAIL_DOMAINS)}"

        email = self.unique(make_email)
        phone = self.unique(lambda: f"+1{rng.choice(areas)}555{rng.randrange(100, 10_000):04d}")
        dob = (date(1948, 1, 1) + timedelta(days=rng.randrange(58 * 365))).isoformat()
        c = _Customer(
            first_name=first,
            last_name=last,
            email=email,
            phone=phone,
            dob=dob,
            street_no=rng.randint(1, 9899),
            street=rng.choice(STREETS),
            suffix=rng.choice(STREET_SUFFIXES),
            unit=f"Apt {rng.randint(1, 40)}" if rng.random() < 0.3 else "",
            city=city,
            state=state,
            postcode=f"{zip_prefix}{rng.randint(1, 99):02d}",
            activity=min(6.0, rng.lognormvariate(-0.32, 0.8)),
            locale=rng.choice(LOCALES),
            user_agent=rng.choice(USER_AGENTS),
            ip=f"{rng.choice(IP_PREFIXES)}{rng.randint(1, 254)}",
        )
        c.anonymous_ids = [self.unique(self.uuid) for _ in range(1 + (rng.random() < 0.35))]
        if rng.random() < 0.65:
            c.user_id = self.unique(lambda: f"usr_{rng.getrandbits(48):012x}")
            if rng.random() < 0.5:
                c.platform = "ios" if rng.random() < 0.55 else "android"
                if c.platform == "ios":
                    c.device_id = self.unique(lambda: self.uuid().upper())
                    c.device = rng.choice(IOS_DEVICES)
                else:
                    c.device_id = self.unique(lambda: f"{rng.getrandbits(64):016x}")
                    c.device = rng.choice(ANDROID_DEVICES)
                c.app_version = rng.choice(APP_VERSIONS)
        c.chat_id = self.unique(lambda: f"zd-v-{rng.getrandbits(48):012x}")
        if rng.random() < 0.35:
            c.loyalty_id = self.unique(lambda: f"LY{rng.randrange(10**10):010d}")
            c.home_store = next((sid for sid, sc in STORES if sc == city), rng.choice(STORES)[0])
        if rng.random() < 0.6:
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
            c.crm_id = self.unique(lambda: "0035g" + "".join(rng.choice(alphabet) for _ in range(13)))
        if rng.random() < 0.12:
            c.social_handle = self.unique(lambda: f"@{fa}{la[:4]}{rng.randint(1, 999)}")
        c.email_opt_in = rng.random() < 0.8
        c.sms_opt_in = rng.random() < 0.3
        c.service_rate = 1.6 * rng.random() if rng.random() < 0.7 else 0.0
        return c

    def traits(self, c: _Customer, *, full: bool) -> Json:
        """Identify traits with the inconsistencies real systems have: nicknames, typos, abbreviations."""
        rng = self.rng
        first = c.first_name
        if first in NICKNAMES and rng.random() < 0.2:
            first = NICKNAMES[first]
        elif rng.random() < 0.04:
            first = first.lower()
        last = c.last_name
        if len(last) > 3 and rng.random() < 0.05:
            i = rng.randrange(len(last) - 2) + 1
            last = last[:i] + last[i + 1] + last[i] + last[i + 2 :]
        suffix = c.suffix[1] if rng.random() < 0.4 else c.suffix[0]
        address = f"{c.street_no} {c.street} {suffix}"
        if c.unit:
            unit = c.unit if rng.random() < 0.7 else c.unit.replace("Apt ", "#")
            address = f"{address}, {unit}"
        traits: Json = {
            "first_name": first,
            "last_name": last,
            "email": self.email_variant(c.email),
        }
        if full or rng.random() < 0.5:
            traits["phone"] = self.phone_variant(c.phone, 0.5)
        if full or rng.random() < 0.3:
            traits["date_of_birth"] = c.dob
        if full or rng.random() < 0.4:
            traits["address"] = address
            traits["city"] = c.city if rng.random() < 0.95 else c.city.upper()
            traits["state"] = c.state
            zip4 = rng.random() < 0.07
            traits["postcode"] = f"{c.postcode}-{rng.randint(1000, 9999)}" if zip4 else c.postcode
        return traits

    # ---- channels ----------------------------------------------------------------------------------

    def web(self, c: _Customer) -> None:
        """Browsing sessions: anonymous at first, logged in (user_id + email) some of the time."""
        rng = self.rng
        sessions = _poisson(rng, 2.4 * c.activity * self.scale)
        signed_up = False
        for _ in range(sessions):
            ts = self.when(DIGITAL_HOURS, 2 * HOUR)
            logged_in = bool(c.user_id) and rng.random() < 0.5
            ids: Ids = [("anonymous_id", rng.choice(c.anonymous_ids))]
            if logged_in:
                ids += [("user_id", c.user_id), ("email", self.email_variant(c.email))]
            via = _Via(WEB, "web-sdk", ids)
            referrer = rng.choice(REFERRERS)
            ctx: Json = {"user_agent": c.user_agent, "ip": c.ip, "locale": c.locale}
            if rng.random() < 0.2:
                slug = rng.choice(self.email_campaigns)[1]
                ctx["campaign"] = {"source": "newsletter", "medium": "email", "name": slug}
            if logged_in and not signed_up and rng.random() < 0.15:
                signed_up = True
                self.identify(ts, via, self.traits(c, full=False), ctx)
                self.track(ts + 1, via, "Signed Up", {"method": "email"}, ctx)
                ts += rng.randint(5, 60)
            for _ in range(1 + (rng.random() < 0.4)):
                path, title = rng.choice(PAGES)
                props: Json = {"path": path, "title": title, "url": SHOP_URL + path}
                if referrer:
                    props["referrer"] = referrer
                    referrer = ""
                self.track(ts, via, "Page Viewed", props, ctx)
                ts += rng.randint(8, 180)
            viewed = [self.product() for _ in range(_poisson(rng, 1.2))]
            for sku, name, category, price in viewed:
                props = {"sku": sku, "name": name, "category": category, "price": price, "currency": "USD"}
                self.track(ts, via, "Product Viewed", props, ctx)
                ts += rng.randint(15, 240)
            if viewed and rng.random() < 0.3:
                item = viewed[-1]
                qty = 1 + (rng.random() < 0.15)
                props = {"sku": item[0], "name": item[1], "price": item[3], "quantity": qty}
                self.track(ts, via, "Product Added", {**props, "currency": "USD"}, ctx)
                ts += rng.randint(20, 300)
                if rng.random() < 0.55:
                    props = {"value": round(item[3] * qty, 2), "currency": "USD"}
                    self.track(ts, via, "Checkout Started", props, ctx)
                    ts += rng.randint(60, 400)
                    if rng.random() < 0.75:
                        # A guest checkout still asks for an email: that links the anonymous visitor.
                        buyer = via if logged_in else _Via(WEB, "web-sdk", [*ids, ("email", c.email)])
                        self.order(ts, buyer, c, item, qty, ctx=ctx)
            if logged_in and rng.random() < 0.06:
                self.identify(ts, via, self.traits(c, full=False), ctx)

    def order(
        self, ts: int, via: _Via, c: _Customer, item: tuple[str, str, str, float], qty: int, *, ctx: Json
    ) -> None:
        """An Order Completed with revenue, remembered so service contacts can refer to it."""
        sku, name, _, price = item
        oid = self.order_id()
        subtotal = round(price * qty, 2)
        shipping = 0.0 if subtotal >= 75 or via.channel == STORE else 6.95
        tax = round(subtotal * 0.0825, 2)
        total = round(subtotal + tax + shipping, 2)
        props: Json = {
            "order_id": oid,
            "revenue": subtotal,
            "tax": tax,
            "shipping": shipping,
            "total": total,
            "currency": "USD",
            "products": [{"sku": sku, "name": name, "price": price, "quantity": qty}],
        }
        self.track(ts, via, "Order Completed", props, ctx)
        c.orders.append((oid, name, total))

    def app(self, c: _Customer) -> None:
        """Mobile app sessions: device_id plus the signed-in user_id."""
        if not c.device_id:
            return
        rng = self.rng
        via = _Via(
            APP,
            "ios-app" if c.platform == "ios" else "android-app",
            [("device_id", c.device_id), ("user_id", c.user_id)],
        )
        ctx: Json = {"app_version": c.app_version, "os": c.device[1], "device_model": c.device[0], "locale": c.locale}
        for _ in range(_poisson(rng, 2.2 * c.activity * self.scale)):
            ts = self.when(DIGITAL_HOURS, 2 * HOUR)
            self.track(ts, via, "Application Opened", {"from_background": rng.random() < 0.4}, ctx)
            ts += rng.randint(3, 60)
            for _ in range(_poisson(rng, 1.0)):
                item = self.product()
                props: Json = {
                    "sku": item[0],
                    "name": item[1],
                    "category": item[2],
                    "price": item[3],
                    "currency": "USD",
                }
                self.track(ts, via, "Product Viewed", props, ctx)
                ts += rng.randint(10, 200)
                if rng.random() < 0.12:
                    self.order(ts, via, c, item, 1, ctx=ctx)
                    ts += rng.randint(30, 120)

    def email_marketing(self, c: _Customer) -> None:
        """Campaign sends, opens and clicks keyed by email, sometimes with the CRM id."""
        if not c.email_opt_in:
            return
        rng = self.rng
        ids: Ids = [("email", c.email)]
        if c.crm_id and rng.random() < 0.5:
            ids.append(("crm_id", c.crm_id))
        via = _Via(EMAIL, "salesforce-marketing", ids)
        for send_ts, campaign_id, subject in self.email_campaigns:
            if rng.random() > 0.45:
                continue
            props: Json = {"campaign_id": campaign_id, "subject": subject}
            ts = send_ts + rng.randint(0, 1800)
            self.track(ts, via, "Email Delivered", props)
            if rng.random() < 0.35:
                ts += _lognorm(rng, 3 * HOUR, 1.2, 60, 4 * DAY)
                self.track(ts, via, "Email Opened", props)
                if rng.random() < 0.25:
                    ts += rng.randint(5, 300)
                    link = f"{SHOP_URL}/collections/new?utm_campaign={campaign_id}"
                    self.track(ts, via, "Email Link Clicked", {**props, "link_url": link})
                elif rng.random() < 0.02:
                    self.track(ts + 30, via, "Unsubscribed", props)
                    return

    def sms_marketing(self, c: _Customer) -> None:
        """SMS campaign deliveries and clicks keyed by phone in E.164, as the SMS gateway sends it."""
        if not c.sms_opt_in:
            return
        rng = self.rng
        via = _Via(SMS, "twilio", [("phone", c.phone)])
        for send_ts, campaign_id, text in self.sms_campaigns:
            if rng.random() > 0.6:
                continue
            ts = send_ts + rng.randint(0, 900)
            self.track(ts, via, "SMS Delivered", {"campaign_id": campaign_id, "body": text})
            if rng.random() < 0.12:
                self.track(ts + rng.randint(30, 3600), via, "SMS Link Clicked", {"campaign_id": campaign_id})

    def store(self, c: _Customer) -> None:
        """Point-of-sale purchases by loyalty card, and the loyalty signup that links it to an email."""
        if not c.loyalty_id:
            return
        rng = self.rng
        visits = _poisson(rng, 1.5 * c.activity * self.scale)
        for v in range(visits):
            ts = self.when(CONTACT_HOURS, 2 * HOUR)
            store_id = c.home_store if rng.random() < 0.8 else rng.choice(STORES)[0]
            ctx: Json = {
                "store_id": store_id,
                "terminal_id": f"pos-{rng.randint(1, 6)}",
                "associate_id": f"emp-{rng.randint(1000, 1400)}",
            }
            ids: Ids = [("loyalty_id", c.loyalty_id)]
            if v == 0 and rng.random() < 0.45:
                email = self.email_variant(c.email)
                traits: Json = {
                    "first_name": c.first_name,
                    "last_name": c.last_name,
                    "email": email,
                    "postcode": c.postcode,
                }
                signup: Ids = [*ids, ("email", email)]
                if rng.random() < 0.5:
                    traits["phone"] = self.phone_variant(c.phone, 0.7)
                    signup.append(("phone", traits["phone"]))
                self.identify(ts, _Via(STORE, "pos", signup), traits, ctx)
                ts += 20
            elif rng.random() < 0.15:
                ids.append(("phone", self.phone_variant(c.phone, 0.8)))  # looked up by phone at the till
            via = _Via(STORE, "pos", ids)
            item = self.product()
            payment = rng.choice(("card", "card", "apple_pay", "cash"))
            self.order(ts, via, c, item, 1 + (rng.random() < 0.25), ctx={**ctx, "payment_method": payment})
            if rng.random() < 0.07:
                props: Json = {"order_id": c.orders[-1][0], "sku": item[0], "refund": item[3]}
                props["currency"] = "USD"
                self.track(ts + rng.randint(2, 10) * DAY, via, "Product Returned", props, ctx)

    def crm(self, c: _Customer) -> None:
        """CRM sync of the contact record: the main link between crm_id, email and phone."""
        if not c.crm_id:
            return
        rng = self.rng
        for _ in range(1 + (rng.random() < 0.3)):
            ts = self.when(CONTACT_HOURS, HOUR)
            traits = self.traits(c, full=True)
            ids: Ids = [("crm_id", c.crm_id), ("email", traits["email"]), ("phone", traits["phone"])]
            traits["lifecycle_stage"] = "customer"
            self.identify(ts, _Via(OTHER, "salesforce-crm", ids), traits)

    def relationship_survey(self, c: _Customer) -> None:
        """The quarterly relationship NPS, emailed and not tied to any contact."""
        rng = self.rng
        if not c.email_opt_in or rng.random() > 0.12:
            return
        ts = self.when(DIGITAL_HOURS, HOUR)
        score = rng.choices(range(11), NPS_RELATIONSHIP)[0]
        ids: Ids = [("email", c.email)]
        if c.crm_id:
            ids.append(("crm_id", c.crm_id))
        kind = event_pb2.SURVEY_TYPE_NPS
        self.survey(
            ts, _Via(EMAIL, "qualtrics", ids), kind, score, SURVEY_RELATIONSHIP_NPS, comment=self.comment(kind, score)
        )

    def comment(self, kind: event_pb2.SurveyType.ValueType, score: int) -> str:
        """A free-text comment matching the score, on about a third of answers."""
        rng = self.rng
        if rng.random() > 0.35:
            return ""
        if kind == event_pb2.SURVEY_TYPE_NPS:
            band = 0 if score <= 6 else 1 if score <= 8 else 2
        elif kind == event_pb2.SURVEY_TYPE_CSAT:
            band = 0 if score <= 2 else 1 if score == 3 else 2
        else:
            band = 0 if score <= 3 else 1 if score == 4 else 2
        return rng.choice((COMMENTS_NEGATIVE, COMMENTS_NEUTRAL, COMMENTS_POSITIVE)[band])

    # ---- service contacts ----------------------------------------------------------------------------

    def contact_via(self, c: _Customer, channel: Channel) -> _Via:
        """The source system and identifiers a contact on this channel carries."""
        rng = self.rng
        if channel == VOICE:
            ids: Ids = [("phone", self.phone_variant(c.phone, 0.3))]
            if c.crm_id and rng.random() < 0.3:
                ids.append(("crm_id", c.crm_id))  # screen-pop matched the CRM record
            return _Via(channel, "genesys-cloud", ids)
        if channel == CHAT:
            ids = [("chat_id", c.chat_id)]
            if rng.random() < 0.4:
                ids.append(("email", self.email_variant(c.email)))  # pre-chat form
            elif c.user_id and rng.random() < 0.3:
                ids.append(("user_id", c.user_id))  # chatting while signed in
            return _Via(channel, "zendesk", ids)
        if channel == EMAIL:
            ids = [("email", self.email_variant(c.email))]
            if c.crm_id and rng.random() < 0.2:
                ids.append(("crm_id", c.crm_id))
            return _Via(channel, "zendesk", ids)
        if channel == SMS:
            return _Via(channel, "twilio", [("phone", c.phone)])
        ids = [("social_handle", c.social_handle)]
        if rng.random() < 0.1:
            ids.append(("email", c.email))
        return _Via(channel, "sprinklr", ids)

    def interaction_id(self, channel: Channel) -> str:
        """Ids shaped like each platform's own."""
        rng = self.rng
        if channel == VOICE:
            return self.unique(self.uuid)
        if channel == SMS:
            return self.unique(lambda: f"CH{rng.getrandbits(128):032x}")
        if channel == SOCIAL:
            return self.unique(lambda: f"spr-{rng.randrange(10**10):010d}")
        return self.unique(lambda: f"zd-{rng.randrange(10**8):08d}")

    def service(self, c: _Customer) -> None:
        """Service contact chains: a contact and, when unresolved, repeats on the same reason (for FCR)."""
        rng = self.rng
        for _ in range(_poisson(rng, c.service_rate * c.activity * self.scale)):
            reason = rng.choices(self.reason_names, self.reason_weights)[0]
            channel = self.pick_channel(c)
            n = 1
            while n < 3 and rng.random() < (0.3 if n == 1 else 0.25):
                n += 1
            self.case_no += rng.randint(1, 9)
            case_id = f"CS-{self.case_no:07d}"
            ts = self.when(CONTACT_HOURS, 15 * HOUR, weekend=0.6)
            for k in range(n):
                resolved = rng.random() < (0.85 if k == n - 1 else 0.2)
                end = self.contact(c, channel, reason, ts, case_id, resolved=resolved, repeat=k)
                if end is None:
                    break
                ts = end + _lognorm(rng, 1.5 * DAY, 0.7, 2 * HOUR, 6 * DAY)
                if rng.random() < 0.4:
                    channel = self.pick_channel(c)

    def pick_channel(self, c: _Customer) -> Channel:
        """Voice still dominates contact volume, then chat, email, SMS and social."""
        options: list[Channel] = [VOICE, CHAT, EMAIL, SMS]
        weights = [40.0, 30.0, 15.0, 8.0]
        if c.social_handle:
            options.append(SOCIAL)
            weights.append(25.0)
        return self.rng.choices(options, weights)[0]

    def plan_legs(self, channel: Channel, queue: str, arrival: int, *, resolved: bool, outbound: bool) -> list[_Leg]:
        """Durations per channel, with abandons and transfers on the live channels."""
        rng = self.rng
        live = channel in (VOICE, CHAT)
        if channel == VOICE:
            wait = 0 if outbound else _lognorm(rng, 35, 1.0, 0, 1200)
            talk, hold = _lognorm(rng, 330, 0.6, 20, 5400), 0
            if rng.random() < 0.45:
                hold = _lognorm(rng, 45, 0.8, 5, 1200)
            acw = _lognorm(rng, 50, 0.6, 0, 900)
        elif channel == CHAT:
            wait = _lognorm(rng, 25, 1.0, 0, 1200)
            talk, hold = _lognorm(rng, 540, 0.6, 60, 5400), 0
            if rng.random() < 0.15:
                hold = _lognorm(rng, 30, 0.7, 5, 600)
            acw = _lognorm(rng, 40, 0.6, 0, 600)
        elif channel == EMAIL:
            wait = 0 if outbound else _lognorm(rng, 3 * HOUR, 0.9, 300, 12 * HOUR)
            talk, hold, acw = _lognorm(rng, 240, 0.7, 30, 3600), 0, _lognorm(rng, 60, 0.6, 0, 900)
        else:  # SMS and social: asynchronous, minutes to a first response
            wait = _lognorm(rng, 900 if channel == SMS else 1500, 1.0, 30, 6 * HOUR)
            talk, hold, acw = _lognorm(rng, 500, 0.6, 60, 3600), 0, _lognorm(rng, 30, 0.6, 0, 600)
        if live and not outbound and rng.random() < (0.07 if channel == VOICE else 0.05):
            return [_Leg(arrival, _lognorm(rng, 110, 0.8, 5, 1800), 0, 0, 0, queue, "", "abandoned")]
        agent = self.agent(queue)
        disposition = "resolved" if resolved else rng.choice(UNRESOLVED_DISPOSITIONS)
        if live and rng.random() < (0.12 if channel == VOICE else 0.06):
            first = _Leg(
                arrival,
                wait,
                _lognorm(rng, 150, 0.6, 20, 1800),
                min(hold, 120),
                _lognorm(rng, 20, 0.5, 0, 300),
                queue,
                agent,
                "transferred",
                transferred=True,
            )
            target = rng.choice(TRANSFER_TO[queue])
            second = _Leg(
                first.ended,
                _lognorm(rng, 20, 0.9, 0, 900),
                talk,
                hold,
                acw,
                target,
                self.agent(target, exclude=agent),
                disposition,
            )
            return [first, second]
        return [_Leg(arrival, wait, talk, hold, acw, queue, agent, disposition)]

    def contact(
        self,
        c: _Customer,
        channel: Channel,
        reason: str,
        arrival: int,
        case_id: str,
        *,
        resolved: bool,
        repeat: int,
    ) -> int | None:
        """Emit one contact (legs, conversation, maybe a survey); returns when it ended, or None."""
        rng = self.rng
        queue = REASONS[reason][0]
        outbound = channel in (VOICE, EMAIL) and repeat > 0 and rng.random() < 0.3  # agent follows up
        legs = self.plan_legs(channel, queue, arrival, resolved=resolved, outbound=outbound)
        end = legs[-1].ended + legs[-1].acw
        if end > self.now:
            return None
        iid = self.interaction_id(channel)
        via = self.contact_via(c, channel)
        if len(legs) == 2:
            for i, leg in enumerate(legs, start=1):
                leg.leg_id = f"{iid}:{i}"
        abandoned = not legs[0].agent
        if resolved and not abandoned:
            legs[-1].disposition = RESOLVED_DISPOSITIONS[reason]
        if abandoned:
            status = event_pb2.CASE_STATUS_UNSPECIFIED
        elif resolved:
            status = event_pb2.CASE_STATUS_RESOLVED if rng.random() < 0.8 else event_pb2.CASE_STATUS_CLOSED
        else:
            status = event_pb2.CASE_STATUS_OPEN if repeat == 0 else event_pb2.CASE_STATUS_PENDING
        props: Json | None = None
        if channel == VOICE:
            props = {"ivr_path": f"main>{queue}", "language": c.locale, "dnis": "+18005550100"}
        elif channel == EMAIL:
            props = {"subject": f"Re: {reason.replace('_', ' ').capitalize()}", "ticket_via": "email"}
        for leg in legs:
            self.interaction(
                leg,
                via,
                iid,
                reason,
                case_id,
                outbound=outbound,
                props=props,
                case_status=event_pb2.CASE_STATUS_OPEN if leg.transferred else status,
            )
        order = c.orders[-1] if c.orders else (self.order_id(), self.product()[1], 0.0)
        amount = order[2] or round(rng.uniform(20, 250), 2)
        fill = {
            "order": order[0],
            "product": order[1],
            "amount": f"${amount:.2f}",
            "first": c.first_name,
            "city": c.city,
        }
        if channel in (CHAT, SMS, SOCIAL):
            self.conversation(via, iid, reason, legs, fill=fill, resolved=resolved, repeat=repeat)
        if not abandoned and rng.random() < 0.3:
            good = resolved and repeat == 0 and len(legs) == 1
            self.post_contact_survey(c, via, iid, end, good=good)
        return end

    def conversation(
        self,
        via: _Via,
        iid: str,
        reason: str,
        legs: list[_Leg],
        *,
        fill: dict[str, str],
        resolved: bool,
        repeat: int,
    ) -> None:
        """Utterances of a chat, SMS or social conversation, spread over its legs."""
        rng = self.rng
        customer, agent_author, bot = event_pb2.AUTHOR_CUSTOMER, event_pb2.AUTHOR_AGENT, event_pb2.AUTHOR_BOT
        channel = via.channel
        first = legs[0]
        ts = first.arrival

        def say(author: event_pb2.Author.ValueType, template: str, agent_id: str = "", **extra: str) -> None:
            text = template.format(**fill, **extra)
            self.message(ts, via, iid, author, text, agent=agent_id)

        if channel == SOCIAL:
            mood = rng.random()
            pool: Sequence[str] = SOCIAL_NEGATIVE
            if not repeat and mood >= 0.55:
                pool = SOCIAL_POSITIVE if mood < 0.75 else SOCIAL_NEUTRAL
            say(customer, rng.choice(pool))
        else:
            if channel == CHAT:
                say(bot, rng.choice(BOT_GREETINGS))
                ts += rng.randint(5, 40)
            say(customer, rng.choice(OPENERS[reason]))
            if repeat:
                ts += rng.randint(5, 30)
                say(customer, rng.choice(FRUSTRATED))
            if channel == CHAT and first.wait > 20:
                ts += 3
                minutes = str(max(1, first.wait // 60))
                say(bot, rng.choice(BOT_HANDOFFS), queue=QUEUES[first.queue][0], wait=minutes)
        if not first.agent:
            ts = max(ts + 5, first.ended - rng.randint(0, 5))
            if rng.random() < 0.6:
                say(customer, rng.choice(ABANDON_LINES))
            return
        asks = reason not in ("password_reset", "product_question", "plan_upgrade", "cancel_membership")
        for i, leg in enumerate(legs):
            name = self.agent_names[leg.agent]
            ts = max(ts + 1, leg.started)
            step = max(1, (leg.talk + leg.hold) // 6)
            if channel == SOCIAL:
                say(agent_author, rng.choice(SOCIAL_REPLIES), leg.agent, initials=name[:1])
            else:
                say(agent_author, rng.choice(AGENT_GREETINGS), leg.agent, agent=name)
            ts += rng.randint(1, step)
            if i == 0 and asks:
                say(agent_author, rng.choice(AGENT_ASKS), leg.agent)
                ts += rng.randint(1, step)
                say(customer, rng.choice(CUSTOMER_DETAILS))
                ts += rng.randint(1, step)
            if leg.transferred:
                say(agent_author, rng.choice(AGENT_TRANSFERS), leg.agent, queue=QUEUES[legs[i + 1].queue][0])
                continue
            say(agent_author, RESOLUTIONS[reason] if resolved else rng.choice(UNRESOLVED), leg.agent)
            ts += rng.randint(1, step)
            mood = rng.random()
            close: Sequence[str]
            if resolved and mood < 0.8:
                close = CLOSING_POSITIVE
            elif resolved or mood < 0.4:
                close = CLOSING_NEUTRAL
            else:
                close = CLOSING_NEGATIVE
            say(customer, rng.choice(close))
            ts = min(max(ts + 1, leg.ended - rng.randint(0, 20)), leg.ended)
            if channel != SOCIAL:
                say(agent_author, rng.choice(AGENT_CLOSINGS), leg.agent)

    def post_contact_survey(self, c: _Customer, via: _Via, iid: str, end: int, *, good: bool) -> None:
        """IVR survey after a call, CSAT after digital contacts; scores skew with how the contact went."""
        rng = self.rng
        if via.channel == VOICE:
            ts = end + rng.randint(5, 60)
            if rng.random() < 0.5:
                kind, survey_id = event_pb2.SURVEY_TYPE_NPS, SURVEY_POSTCALL_NPS
                score = rng.choices(range(11), NPS_GOOD if good else NPS_BAD)[0]
            else:
                kind, survey_id = event_pb2.SURVEY_TYPE_CES, SURVEY_POSTCALL_CES
                score = rng.choices(range(1, 8), CES_GOOD if good else CES_BAD)[0]
        else:
            kind, survey_id = event_pb2.SURVEY_TYPE_CSAT, SURVEY_DIGITAL_CSAT
            score = rng.choices(range(1, 6), CSAT_GOOD if good else CSAT_BAD)[0]
            if via.channel == EMAIL:
                ts = end + _lognorm(rng, 4 * HOUR, 0.8, 600, 2 * DAY)
            elif via.channel == SOCIAL:
                # Social platforms have no survey step, so the survey goes out by email.
                via = _Via(EMAIL, "qualtrics", [("email", c.email)])
                ts = end + _lognorm(rng, 6 * HOUR, 0.8, 600, 2 * DAY)
            else:
                ts = end + rng.randint(5, 600)
        self.survey(ts, via, kind, score, survey_id, interaction_id=iid, comment=self.comment(kind, score))

    # ---- the persona ---------------------------------------------------------------------------------

    def persona(self) -> None:
        """Maya's story: browses, buys, calls twice about a late delivery, chats, joins loyalty in store.

        Times are fractions of the last 28 days (or of a shorter window), ending a few hours before
        now, so the story fits any window and her two calls stay a few days apart. With the full 28
        days each step also moves to a plausible local hour of its day, which keeps the story's order.
        """
        p = PERSONA
        snap = self.days >= 28
        span = 28 * DAY - 30 * HOUR if snap else self.days * DAY - 6 * HOUR
        base = self.now - 6 * HOUR - span

        def at(frac: float, local_hour: float) -> int:
            ts = base + int(frac * span)
            if snap:
                ts += int(local_hour * HOUR) - (ts - 5 * HOUR) % DAY
            return ts

        traits: Json = {
            "first_name": p.first_name,
            "last_name": p.last_name,
            "email": p.email,
            "phone": p.phone,
            "date_of_birth": "1988-04-17",
            "address": "2150 Mission Street, Apt 4",
            "city": "San Francisco",
            "state": "CA",
            "postcode": "94110",
        }
        web_ctx: Json = {"user_agent": USER_AGENTS[1], "ip": "198.51.100.42", "locale": "en-US"}
        anon = _Via(WEB, "web-sdk", [("anonymous_id", p.anonymous_id)])
        known = _Via(WEB, "web-sdk", [*anon.ids, ("user_id", p.user_id), ("email", p.email)])
        sku, name, category, price = PRODUCTS[4]
        line = {"sku": sku, "name": name, "price": price, "quantity": 1}

        # Web: browses anonymously, signs up (email + phone), buys a rain shell.
        t = at(0.02, 12.3)
        self.track(
            t,
            anon,
            "Page Viewed",
            {
                "path": "/collections/outdoor",
                "title": "Outdoor",
                "url": f"{SHOP_URL}/collections/outdoor",
                "referrer": "https://www.instagram.com/",
            },
            web_ctx,
            junk=False,
        )
        self.track(
            t + 95, anon, "Product Viewed", {**line, "category": category, "currency": "USD"}, web_ctx, junk=False
        )
        t = at(0.05, 20.5)
        signup = _Via(WEB, "web-sdk", [*known.ids, ("phone", p.phone)])
        self.identify(t, signup, traits, web_ctx, junk=False)
        self.track(t + 2, known, "Signed Up", {"method": "email"}, web_ctx, junk=False)
        self.track(t + 140, known, "Product Added", {**line, "currency": "USD"}, web_ctx, junk=False)
        order_id = "HP-0424242"
        self.track(
            t + 420,
            known,
            "Order Completed",
            {
                "order_id": order_id,
                "revenue": price,
                "tax": 10.64,
                "shipping": 0.0,
                "total": 139.64,
                "currency": "USD",
                "products": [line],
            },
            web_ctx,
            junk=False,
        )

        # First call: a national-format caller id; the late delivery is left open.
        orders_agent, chat_agent, billing_agent = "agt-118", "agt-121", "agt-104"
        case_id = "CS-0999001"
        voice_props: Json = {"ivr_path": "main>orders", "language": "en-US", "dnis": "+18005550100"}
        call1 = "7d1e9a4c-3b2f-4e8a-9c61-5a0f2b7d3e11"
        leg = _Leg(at(0.30, 10.25), 48, 312, 65, 55, "orders", orders_agent, "follow_up_required")
        self.interaction(
            leg,
            _Via(VOICE, "genesys-cloud", [("phone", p.phone_national)]),
            call1,
            "delivery_delay",
            case_id,
            case_status=event_pb2.CASE_STATUS_OPEN,
            props=voice_props,
            junk=False,
        )
        # The agent creates her CRM record after the call.
        crm = _Via(OTHER, "salesforce-crm", [("crm_id", p.crm_id), ("phone", p.phone_national), ("email", p.email)])
        crm_traits: Json = {**traits, "phone": p.phone_national, "lifecycle_stage": "customer"}
        self.identify(leg.ended + HOUR, crm, crm_traits, junk=False)

        # Chat about a day later: the chat id, plus the pre-chat form that links it to her email.
        chat_id = "zd-90000142"
        chat = _Via(CHAT, "zendesk", [("chat_id", p.chat_id)])
        t = at(0.34, 19.6)
        self.identify(
            t - 30,
            _Via(CHAT, "zendesk", [*chat.ids, ("email", p.email)]),
            {"first_name": p.first_name, "email": p.email},
            junk=False,
        )
        chat_leg = _Leg(t, 95, 620, 0, 40, "orders", chat_agent, "follow_up_required")
        self.interaction(
            chat_leg, chat, chat_id, "delivery_delay", case_id, case_status=event_pb2.CASE_STATUS_PENDING, junk=False
        )
        agent_name = self.agent_names[chat_agent]
        lines: list[tuple[int, event_pb2.Author.ValueType, str]] = [
            (0, event_pb2.AUTHOR_BOT, BOT_GREETINGS[0]),
            (
                20,
                event_pb2.AUTHOR_CUSTOMER,
                f"My order {order_id} still hasn't arrived and I called yesterday. Nobody got back to me.",
            ),
            (30, event_pb2.AUTHOR_CUSTOMER, "Honestly this is really frustrating, I needed the jacket for a trip."),
            (100, event_pb2.AUTHOR_AGENT, f"Hi Maya, I'm {agent_name}. I'm so sorry about this, let me check."),
            (
                300,
                event_pb2.AUTHOR_AGENT,
                "The parcel was held at the depot. I've asked the carrier to deliver it tomorrow morning.",
            ),
            (420, event_pb2.AUTHOR_CUSTOMER, "Ok. I hope it actually turns up this time."),
            (700, event_pb2.AUTHOR_AGENT, "I'll keep the case open until it's delivered. Anything else today?"),
        ]
        for offset, author, text in lines:
            agent = chat_agent if author == event_pb2.AUTHOR_AGENT else ""
            self.message(t + offset, chat, chat_id, author, text, agent=agent, junk=False)
        self.survey(
            chat_leg.ended + 120,
            chat,
            event_pb2.SURVEY_TYPE_CSAT,
            2,
            SURVEY_DIGITAL_CSAT,
            interaction_id=chat_id,
            comment="Still no jacket, and I had to contact you twice.",
            junk=False,
        )

        # Second call a few days after the first: E.164 caller id, transferred to billing for a refund.
        call2 = "2c8b5f0e-9a7d-4b13-8e42-6d1f3a9c7b25"
        voice = _Via(VOICE, "genesys-cloud", [("phone", p.phone)])
        leg1 = _Leg(
            at(0.40, 9.5), 30, 140, 40, 15, "orders", orders_agent, "transferred", transferred=True, leg_id=f"{call2}:1"
        )
        leg2 = _Leg(leg1.ended, 25, 260, 0, 70, "billing", billing_agent, "shipping_refunded", leg_id=f"{call2}:2")
        for voice_leg, status in ((leg1, event_pb2.CASE_STATUS_OPEN), (leg2, event_pb2.CASE_STATUS_RESOLVED)):
            self.interaction(
                voice_leg, voice, call2, "delivery_delay", case_id, case_status=status, props=voice_props, junk=False
            )
        self.survey(
            leg2.ended + 20,
            voice,
            event_pb2.SURVEY_TYPE_NPS,
            6,
            SURVEY_POSTCALL_NPS,
            interaction_id=call2,
            comment="Sorted in the end, but it took three contacts.",
            junk=False,
        )
        self.track(
            leg2.ended + 3 * HOUR,
            _Via(SMS, "twilio", voice.ids),
            "SMS Delivered",
            {
                "campaign_id": "txn-delivery-update",
                "body": f"Harbor & Pine: your order {order_id} is out for delivery today.",
            },
            junk=False,
        )
        # She answers the text; an orders agent changes the drop-off by SMS.
        sms = _Via(SMS, "twilio", voice.ids)
        sms_id = "CH5f3a9c7b2e8d4f1a6b0c9e7d3a2f1b84"
        t = leg2.ended + 3 * HOUR + 25 * 60
        sms_leg = _Leg(t, 240, 300, 0, 30, "orders", chat_agent, "information_provided")
        self.interaction(sms_leg, sms, sms_id, "order_status", "", case_status=event_pb2.CASE_STATUS_UNSPECIFIED,
                         junk=False)  # fmt: skip
        for offset, author, text in (
            (0, event_pb2.AUTHOR_CUSTOMER, "Great, thanks! Can the driver leave it at my building's front desk?"),
            (240, event_pb2.AUTHOR_AGENT, "Hi Maya, done: the driver will leave it with the front desk today."),
            (420, event_pb2.AUTHOR_CUSTOMER, "Perfect, thank you so much!"),
        ):
            agent = chat_agent if author == event_pb2.AUTHOR_AGENT else ""
            self.message(t + offset, sms, sms_id, author, text, agent=agent, junk=False)

        # In store: the loyalty signup links the card to her email; later purchases carry the card only.
        store_ctx: Json = {"store_id": "store-0101", "terminal_id": "pos-2", "associate_id": "emp-1207"}
        card = _Via(STORE, "pos", [("loyalty_id", p.loyalty_id)])
        t = at(0.60, 17.75)
        loyalty_traits: Json = {"first_name": p.first_name, "last_name": p.last_name, "email": p.email}
        loyalty_traits["postcode"] = "94110"
        self.identify(t, _Via(STORE, "pos", [*card.ids, ("email", p.email)]), loyalty_traits, store_ctx, junk=False)
        for when, (item_sku, item_name, _, item_price), order, total, payment in (
            (t + 60, PRODUCTS[15], "HP-0424990", 38.97, "apple_pay"),
            (at(0.82, 12.5), PRODUCTS[14], "HP-0425311", 84.44, "card"),
        ):
            item_line: Json = {"sku": item_sku, "name": item_name, "price": item_price, "quantity": 1}
            self.track(
                when,
                card,
                "Order Completed",
                {"order_id": order, "revenue": item_price, "total": total, "currency": "USD", "products": [item_line]},
                {**store_ctx, "payment_method": payment},
                junk=False,
            )

        # Email: a campaign open and the relationship NPS, now as a promoter.
        mail = _Via(EMAIL, "salesforce-marketing", [("email", p.email)])
        campaign: Json = {"campaign_id": "cmp-linen-launch-07", "subject": "Meet our new linen collection"}
        self.track(at(0.88, 7.2), mail, "Email Opened", campaign, junk=False)
        # She writes in about the collection; a sales agent answers by email the same morning.
        ticket = _Via(EMAIL, "zendesk", [("email", p.email)])
        email_leg = _Leg(at(0.89, 8.1), 2 * HOUR, 260, 0, 45, "sales", "agt-133", "information_provided")
        self.interaction(email_leg, ticket, "zd-90000143", "product_question", "",
                         case_status=event_pb2.CASE_STATUS_UNSPECIFIED, junk=False)  # fmt: skip
        self.survey(
            at(0.93, 21.0),
            _Via(EMAIL, "qualtrics", mail.ids),
            event_pb2.SURVEY_TYPE_NPS,
            9,
            SURVEY_RELATIONSHIP_NPS,
            junk=False,
            comment="Love the new store in the Mission, the staff are lovely.",
        )

    # ---- driver --------------------------------------------------------------------------------------

    def run(self) -> list[event_pb2.Event]:
        """Generate everything, then order by time and number the events in that order."""
        self.persona()
        for _ in range(self.n_customers):
            c = self.new_customer()
            self.crm(c)
            self.web(c)
            self.app(c)
            self.email_marketing(c)
            self.sms_marketing(c)
            self.store(c)
            self.service(c)
            self.relationship_survey(c)
        self.out.sort(key=lambda item: (item[0], item[1]))
        events = []
        for n, (_, _, ev) in enumerate(self.out, start=1):
            ev.message_id = f"demo-{self.seed}-{n:07d}"
            events.append(ev)
        return events


# --------------------------------------------------------------------------------------------------
# Public API.


def _now_ts(now: datetime | None) -> int:
    """Whole seconds since the epoch; the default is this hour, so reruns within it are identical."""
    if now is None:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return math.floor(now.timestamp())


def generate(
    *, seed: int = 7, customers: int = 2000, days: int = 90, now: datetime | None = None
) -> Iterator[event_pb2.Event]:
    """Return the demo dataset as an iterator sorted by timestamp; same arguments, same events.

    ``now`` defaults to the current UTC hour; a naive ``now`` is taken as UTC. Every timestamp lies in
    ``[now - days, now]``. Server-owned fields (received_at, event_id, profile_id) are left unset.
    Events are equal, and byte-identical under ``SerializeToString(deterministic=True)``; plain
    serialization may order Struct (map) entries differently between processes.
    Arguments are checked at call time. The events are built when iteration starts, all at once,
    because they must be sorted: the default size takes well under a second and about 100 MB.
    """
    if customers < 0:
        raise ValueError("customers must be >= 0")
    if days < 1:
        raise ValueError("days must be >= 1")
    now_ts = _now_ts(now)

    def events() -> Iterator[event_pb2.Event]:
        yield from _Generator(seed, customers, days, now_ts).run()

    return events()


def to_jsonl(events: Iterable[event_pb2.Event], fp: TextIO) -> int:
    """Write proto3-JSON lines (the `tessera import` format) and return how many were written."""
    count = 0
    for ev in events:
        record = json_format.MessageToDict(ev, preserving_proto_field_name=True)
        # Struct fields are a proto map with no fixed order; sorted keys make the file reproducible.
        fp.write(json.dumps(record, separators=(",", ":"), sort_keys=True))
        fp.write("\n")
        count += 1
    return count
