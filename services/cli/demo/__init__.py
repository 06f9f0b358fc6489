"""The demo dataset: a believable quarter of a retailer's touchpoints, seeded and reproducible,
and the demo tenant's configuration."""

from services.cli.demo.generator import generate, to_jsonl
from services.cli.demo.persona import PERSONA, DemoPersona
from services.cli.demo.tenant import CUSTOM_IDENTIFIER_TYPES, configure_quality, configure_tenant
from services.cli.demo.vocabulary import EMAIL_DOMAINS, FIRST_NAMES, LAST_NAMES

__all__ = [
    "CUSTOM_IDENTIFIER_TYPES",
    "EMAIL_DOMAINS",
    "FIRST_NAMES",
    "LAST_NAMES",
    "PERSONA",
    "DemoPersona",
    "configure_quality",
    "configure_tenant",
    "generate",
    "to_jsonl",
]
