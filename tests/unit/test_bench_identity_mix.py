"""``tessera bench identity --matching on``: Identify events carry their own person's traits, so
probabilistic matching has real work and no reason to merge two bench people."""

from __future__ import annotations

from bench.identity import Mix, event_bodies
from tessera.v1 import event_pb2

TOKEN = "0123abcd"


def _events(mix: Mix, count: int, kind: str | None = None) -> list[tuple[int, event_pb2.Event]]:
    out = []
    for _ in range(count):
        _, payload = mix.event(kind)
        out.append((mix.people - 1, event_pb2.Event.FromString(payload)))
    return out


def test_with_matching_an_identify_event_carries_its_persons_own_traits() -> None:
    bodies = event_bodies(customers=20, days=10)
    mix = Mix(bodies, TOKEN, 5, matching=True)
    identifies = [(p, ev) for p, ev in _events(mix, 3 * len(bodies), "new") if ev.HasField("identify")]
    assert len(identifies) > 10
    for person, ev in identifies:
        traits = dict(ev.identify.traits)
        assert traits == mix.person_traits(person)
        assert traits["email"] == mix.emails[person]
        assert "".join(ch for ch in str(traits["phone"]) if ch.isdigit()) == mix.phones[person][2:]
        assert ev.timestamp.seconds > 0 and not ev.HasField("track")
    # A person's traits do not change, and no two people share a full name and birth date (which
    # alone would make them look like one person to the matcher).
    assert mix.person_traits(3) == mix.person_traits(3)
    while mix.people < 2000:
        mix.event("new")
    everyone = [mix.person_traits(p) for p in range(mix.people)]
    assert len({(t["first_name"], t["last_name"], t["date_of_birth"]) for t in everyone}) == len(everyone)
    assert len({t["address"] for t in everyone}) > 0.95 * len(everyone)


def test_without_matching_the_demo_bodies_are_sent_as_they_are() -> None:
    bodies = event_bodies(customers=20, days=10)
    mix = Mix(bodies, TOKEN, 5)
    parsed = [event_pb2.Event.FromString(b) for b in bodies]
    demo = {ev.identify.traits["email"] for ev in parsed if ev.HasField("identify") and "email" in ev.identify.traits}
    assert demo
    for person, ev in _events(mix, len(bodies), "new"):
        if ev.HasField("identify") and "email" in ev.identify.traits:
            assert ev.identify.traits["email"] != mix.emails[person]
            assert ev.identify.traits["email"] in demo
