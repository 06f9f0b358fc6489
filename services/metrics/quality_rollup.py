"""What an evaluation adds to the quality rollups, and the quality metrics computed from them.
Pure, no I/O.

Each evaluation adds, on its interaction's local day, for its form, agent, team, queue and channel: one
row for the evaluation (``question`` empty: scored, auto-failed, the score's sum and square) and
one per scored answer (answered, passed: full points, the share of points earned). When an
evaluation changes (a late message, a new form version, a person's answer) the store adds the
new contribution and subtracts the old, so the rollups always equal the sum of the current
evaluations; a test checks that against the evaluations themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.metrics.stats import Score, mean, rate
from tessera.v1 import quality_pb2

#: (form_id, question_id or "", agent, team, queue, channel)
QualityKey = tuple[str, str, str, str, str, int]
#: The counters of a quality rollup row, in the table's column order.
COLUMNS = ("n", "auto_failed", "passed", "score_sum", "score_sq")
#: Scores are kept in 1/100 of a point (0..10,000), so sums are exact integers.
SCALE = 100
QUALITY_DIMENSIONS = ("form", "question", "agent", "team", "queue", "channel")


@dataclass(frozen=True)
class QualityMetric:
    name: str
    unit: str
    text: str
    formula: str
    per_question: bool


QUALITY_METRICS = (
    QualityMetric(
        "quality_score",
        "points",
        "The mean evaluation score (0-100) of the evaluations in the bucket; an auto-failed evaluation "
        "counts as 0. With a normal 95% interval.",
        "sum(score) / evaluations",
        False,
    ),
    QualityMetric(
        "quality_auto_fail_rate",
        "percent",
        "The share of evaluations an auto-fail answer set to 0, with its Wilson 95% interval.",
        "auto_failed / evaluations",
        False,
    ),
    QualityMetric(
        "quality_pass_rate",
        "percent",
        "The share of scored answers that earned their question's full points (N/A and answers "
        "awaiting a person excluded); group or filter by question for each question's pass rate.",
        "passed / answered",
        True,
    ),
    QualityMetric(
        "quality_points_rate",
        "percent",
        "The share of the available points the scored answers earned.",
        "sum(points) / sum(max points)",
        True,
    ),
)
QUALITY_BY_NAME = {m.name: m for m in QUALITY_METRICS}


def contribution(e: quality_pb2.Evaluation) -> dict[QualityKey, list[float]]:
    """The evaluation's rows: key -> [n, auto_failed, passed, score_sum, score_sq]."""
    form_id = e.form.removeprefix("evaluationForms/")
    dims = (e.agent_id, e.team, e.queue, int(e.channel))
    out: dict[QualityKey, list[float]] = {}
    if e.HasField("score"):
        s = round(e.score * SCALE)
        out[(form_id, "", *dims)] = [1, int(e.auto_failed), 0, s, float(s * s)]
    for a in e.answers:
        if a.not_applicable or a.max_points <= 0 or a.source == quality_pb2.ANSWER_SOURCE_AWAITING_REVIEW:
            continue
        share = round(100 * a.points / a.max_points * SCALE)
        passed = int(a.points >= a.max_points - 1e-9)
        row = out.setdefault((form_id, a.question_id, *dims), [0, 0, 0, 0, 0.0])
        row[0] += 1
        row[1] += int(a.auto_fail)
        row[2] += passed
        row[3] += share
        row[4] += float(share * share)
    return out


def difference(old: quality_pb2.Evaluation | None, new: quality_pb2.Evaluation | None) -> dict[QualityKey, list[float]]:
    """``new - old``, without the keys that did not change."""
    before = contribution(old) if old is not None else {}
    after = contribution(new) if new is not None else {}
    out = {}
    for key in before.keys() | after.keys():
        b, a = before.get(key, [0, 0, 0, 0, 0.0]), after.get(key, [0, 0, 0, 0, 0.0])
        d = [x - y for x, y in zip(a, b, strict=True)]
        if any(d):
            out[key] = d
    return out


def score(metric: str, n: float, auto_failed: float, passed: float, score_sum: float, score_sq: float) -> Score:
    """A quality metric from a bucket's sums (of evaluation rows or of answer rows)."""
    count = int(n)
    if metric == "quality_score":
        return mean(score_sum, score_sq / (SCALE * SCALE), count, SCALE)
    if metric == "quality_auto_fail_rate":
        return rate(int(auto_failed), count)
    if metric == "quality_pass_rate":
        return rate(int(passed), count)
    if count <= 0:
        return Score(None, 0)
    return Score(score_sum / SCALE / count, count)
