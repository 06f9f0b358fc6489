"""The demo tenant's configuration, applied through the public APIs as a tenant's admin would."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from tessera.v1 import identity_pb2, identity_pb2_grpc

#: The identifier types the demo systems send beyond the defaults (CRM, loyalty program, chat
#: platform). Unconfigured types never link anything, so without these the demo would not stitch.
CUSTOM_IDENTIFIER_TYPES: tuple[identity_pb2.IdentifierTypeRule, ...] = (
    identity_pb2.IdentifierTypeRule(type="crm_id", normalizer="trim", priority=95, max_per_profile=1),
    identity_pb2.IdentifierTypeRule(type="loyalty_id", normalizer="trim", priority=85, max_per_profile=1),
    identity_pb2.IdentifierTypeRule(type="chat_id", normalizer="trim", priority=40, max_per_profile=5),
)


def configure_tenant(identity: grpc.Channel, api_key: str, timeout: float = 10.0) -> identity_pb2.IdentityRules:
    """Add the demo's identifier types to the tenant's rules (``UpdateIdentityRules``, mask ``types``)."""
    stub = identity_pb2_grpc.IdentityServiceStub(identity)
    metadata = (("authorization", f"Bearer {api_key}"),)
    current = stub.GetIdentityRules(identity_pb2.GetIdentityRulesRequest(), metadata=metadata, timeout=timeout).rules
    custom = {t.type for t in CUSTOM_IDENTIFIER_TYPES}
    types = [t for t in current.types if t.type not in custom] + list(CUSTOM_IDENTIFIER_TYPES)
    request = identity_pb2.UpdateIdentityRulesRequest(
        rules=identity_pb2.IdentityRules(types=types), update_mask=field_mask_pb2.FieldMask(paths=["types"])
    )
    updated: identity_pb2.IdentityRules = stub.UpdateIdentityRules(request, metadata=metadata, timeout=timeout).rules
    return updated
