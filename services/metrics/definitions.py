"""Every metric: its name, its definition in words, its formula over :class:`Stats`, and the code
that computes it from the same statistics. ``ListMetricDefinitions`` serves this text, so what a
caller reads is what runs. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.metrics import stats as st
from services.metrics.stats import Score, Stats

#: The dimensions a query can split or filter by, in the rollups' key order.
DIMENSIONS: tuple[str, ...] = ("channel", "queue", "agent", "reason", "source")

WILSON = "Wilson score interval, 95%"
NORMAL = "mean +/- 1.96 standard errors (sample variance), 95%; none under 2 observations"
ADJUSTED_WALD = "adjusted Wald: add 3 to n and 3/4 to promoters and detractors, 95%"


@dataclass(frozen=True)
class Metric:
    name: str
    display_name: str
    definition: str
    formula: str
    unit: str
    interval: str
    compute: Callable[[Stats, int], Score]
    #: Needs the open-window count (contact-based FCR).
    uses_pending: bool = False


def _fcr(s: Stats, pending: int) -> Score:
    repeated = s["fcr_repeated"]
    resolved = s["fcr_handled"] - repeated - pending
    found = st.rate(resolved, resolved + repeated)
    return Score(found.value, found.sample_size, found.ci_low, found.ci_high, pending=pending)


def _mean(total: str, square: str, n: str, scale: float = 1.0) -> Callable[[Stats, int], Score]:
    return lambda s, _p: st.mean(s[total], s.square(square), s[n], scale)


def _rate(hits: str, n: str) -> Callable[[Stats, int], Score]:
    return lambda s, _p: st.rate(s[hits], s[n])


def _count(name: str) -> Callable[[Stats, int], Score]:
    return lambda s, _p: Score(float(s[name]), s[name])


METRICS: tuple[Metric, ...] = (
    Metric(
        "nps",
        "Net Promoter Score",
        "NPS survey answers (0-10): percent promoters (9-10) minus percent detractors (0-6), -100 to 100.",
        "(nps_promoters - nps_detractors) / nps_n * 100",
        "score",
        ADJUSTED_WALD,
        lambda s, _p: st.nps(s["nps_promoters"], s["nps_detractors"], s["nps_n"]),
    ),
    Metric(
        "csat",
        "CSAT (top-2-box)",
        "CSAT survey answers (1-5): percent that are 4 or 5. Not the mean (see csat_mean).",
        "csat_top2 / csat_n * 100",
        "percent",
        WILSON,
        _rate("csat_top2", "csat_n"),
    ),
    Metric(
        "csat_mean",
        "CSAT (mean)",
        "CSAT survey answers (1-5): their mean.",
        "csat_sum / csat_n",
        "mean",
        NORMAL,
        _mean("csat_sum", "csat_sq", "csat_n"),
    ),
    Metric(
        "ces_mean",
        "CES (mean)",
        'CES survey answers (1-7 agreement with "made it easy to handle my request"): their mean.',
        "ces_sum / ces_n",
        "mean",
        NORMAL,
        _mean("ces_sum", "ces_sq", "ces_n"),
    ),
    Metric(
        "ces_agree",
        "CES (% agree)",
        "CES survey answers (1-7): percent that are 5, 6 or 7.",
        "ces_agree / ces_n * 100",
        "percent",
        WILSON,
        _rate("ces_agree", "ces_n"),
    ),
    Metric(
        "aht_seconds",
        "Average handle time",
        "Talk + hold + after-contact work per handled contact. A leg is handled when it names an agent and "
        "is not abandoned; each agent leg of a transferred contact is a handled contact; abandoned contacts "
        "do not count.",
        "handle_ms / 1000 / legs_handled",
        "seconds",
        NORMAL,
        _mean("handle_ms", "handle_sq", "legs_handled", 1000.0),
    ),
    Metric(
        "aht_p50_seconds",
        "Handle time, median",
        "The nearest-rank median handle time of handled legs, from a log-bucket histogram (4 buckets per "
        "doubling); the value is the bucket's geometric midpoint, within 9.05% of the exact median.",
        "histogram percentile 0.5",
        "seconds",
        "",
        lambda s, _p: st.percentile(s.hist, 0.5),
    ),
    Metric(
        "aht_p90_seconds",
        "Handle time, 90th percentile",
        "As aht_p50_seconds, at the 90th percentile; within 9.05% of the exact value.",
        "histogram percentile 0.9",
        "seconds",
        "",
        lambda s, _p: st.percentile(s.hist, 0.9),
    ),
    Metric(
        "contact_volume",
        "Contact volume",
        "Contacts offered: distinct interaction ids with at least one Interaction event, at their first leg's start.",
        "offered",
        "count",
        "",
        _count("offered"),
    ),
    Metric(
        "transfer_rate",
        "Transfer rate",
        "Handled contacts with at least one leg that ended in a transfer, over handled contacts.",
        "transferred / handled * 100",
        "percent",
        WILSON,
        _rate("transferred", "handled"),
    ),
    Metric(
        "abandonment_rate",
        "Abandonment rate",
        "Offered contacts that no agent handled and that were abandoned, over offered contacts.",
        "abandoned / offered * 100",
        "percent",
        WILSON,
        _rate("abandoned", "offered"),
    ),
    Metric(
        "average_wait_seconds",
        "Average wait",
        "Seconds in queue before the first leg was answered or abandoned, over offered contacts.",
        "wait_ms / 1000 / offered",
        "seconds",
        "",
        lambda s, _p: st.mean(s["wait_ms"], 0.0, s["offered"], 1000.0) if s["offered"] else Score(None, 0),
    ),
    Metric(
        "service_level",
        "Service level",
        "Offered contacts answered by an agent within the tenant's threshold (default 20 s of wait), over "
        "offered contacts.",
        "answered_sl / offered * 100",
        "percent",
        WILSON,
        _rate("answered_sl", "offered"),
    ),
    Metric(
        "repeat_contact_rate",
        "Repeat-contact rate",
        "Offered contacts preceded by another contact from the same customer (the resolved profile, across "
        "channels) on the same reason within the FCR window, over offered contacts.",
        "repeats / offered * 100",
        "percent",
        WILSON,
        _rate("repeats", "offered"),
    ),
    Metric(
        "fcr",
        "First-contact resolution (contact-based)",
        "Handled contacts with a reason that no other contact from the same customer on the same reason "
        "followed within the tenant's window (default 7 days), across channels; a transfer within one "
        "interaction is not a repeat. Repeated contacts count as soon as the repeat arrives; contacts whose "
        "window is still open are pending, reported apart and not counted.",
        "resolved / (resolved + fcr_repeated) * 100, resolved = fcr_handled - fcr_repeated - pending",
        "percent",
        WILSON,
        _fcr,
        uses_pending=True,
    ),
    Metric(
        "fcr_case",
        "First-contact resolution (case-based)",
        "Cases whose latest status is resolved or closed, resolved with a single contact (one interaction "
        "id), over resolved cases; counted at the case's first contact.",
        "cases_single / cases_resolved * 100",
        "percent",
        WILSON,
        _rate("cases_single", "cases_resolved"),
    ),
    Metric(
        "containment_rate",
        "Containment rate",
        "Conversations with a bot message that no agent took (no handled leg, no agent message) and the "
        "customer did not abandon, over conversations with a bot message.",
        "contained / bot_contacts * 100",
        "percent",
        WILSON,
        _rate("contained", "bot_contacts"),
    ),
    Metric(
        "handoff_rate",
        "Bot-to-agent handoff rate",
        "Conversations with a bot message that an agent then took (a handled leg or an agent message), "
        "over conversations with a bot message.",
        "handoffs / bot_contacts * 100",
        "percent",
        WILSON,
        _rate("handoffs", "bot_contacts"),
    ),
    Metric(
        "sentiment",
        "Customer sentiment",
        "The VADER compound score (-1..1) of each customer message, averaged; >= 0.05 is positive, <= -0.05 negative.",
        "sentiment_sum / 10000 / sentiment_n",
        "sentiment",
        NORMAL,
        _mean("sentiment_sum", "sentiment_sq", "sentiment_n", 10_000.0),
    ),
    Metric(
        "sentiment_positive_rate",
        "Positive messages",
        "Customer messages with a VADER compound score of at least 0.05, over customer messages.",
        "sentiment_positive / sentiment_n * 100",
        "percent",
        WILSON,
        _rate("sentiment_positive", "sentiment_n"),
    ),
    Metric(
        "sentiment_negative_rate",
        "Negative messages",
        "Customer messages with a VADER compound score of at most -0.05, over customer messages.",
        "sentiment_negative / sentiment_n * 100",
        "percent",
        WILSON,
        _rate("sentiment_negative", "sentiment_n"),
    ),
    Metric(
        "survey_responses",
        "Survey responses",
        "NPS, CSAT and CES answers.",
        "nps_n + csat_n + ces_n",
        "count",
        "",
        lambda s, _p: Score(float(s["nps_n"] + s["csat_n"] + s["ces_n"]), s["nps_n"] + s["csat_n"] + s["ces_n"]),
    ),
)
BY_NAME = {m.name: m for m in METRICS}
