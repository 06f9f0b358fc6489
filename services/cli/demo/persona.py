"""The showcase person of the demo: the `DemoPersona` type and its one instance, `PERSONA`.

Maya Okafor's identifiers are fixed rather than drawn from the seed, so a demo, a test or
`tessera up` can name her in advance and check that a resolver stitches her four channels (web
email, voice phone, chat id, loyalty card) into one profile. She lives in her own module because
those callers need her without the generator; the generator reserves her identifiers so no random
customer collides with them, and writes her story with the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["PERSONA", "DemoPersona"]


@dataclass(frozen=True, slots=True)
class DemoPersona:
    """The one customer whose identifiers are spread over four channels, so a demo can show stitching.

    The email is seen on the web, the phone on voice, the chat id in chat and the loyalty id in store;
    Identify events link them, so a resolver that works ends with one profile holding all four.
    """

    first_name: str
    last_name: str
    email: str
    phone: str  # E.164
    phone_national: str  # the same number as a caller-id system might format it
    chat_id: str
    loyalty_id: str
    user_id: str
    anonymous_id: str
    crm_id: str

    @property
    def name(self) -> str:
        """Full display name."""
        return f"{self.first_name} {self.last_name}"


PERSONA: Final = DemoPersona(
    first_name="Maya",
    last_name="Okafor",
    email="maya.okafor@example.com",
    phone="+14155550142",
    phone_national="(415) 555-0142",
    chat_id="zd-v-7f3c9a21e04b",
    loyalty_id="LY4401287305",
    user_id="usr_5c1d2e3f4a5b",
    anonymous_id="0b6f4c1e-8a52-4d7e-9c3a-2f1e5d6a7b80",
    crm_id="0035g00000MayOkfQA",
)
