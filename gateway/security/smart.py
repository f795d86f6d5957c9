"""``/.well-known/smart-configuration``: what this resource server supports (SMART App Launch v2).

Contract: the document lists exactly what the token verifier and the scope compiler implement —
v2 scopes with ``c r u d s`` permissions, v1 ``read``/``write``, query-constrained (granular)
scopes, ``patient/``, ``user/`` and ``system/`` contexts — and the authorization server's
endpoints when they are configured (UniHealth verifies tokens; it does not issue them).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.settings import Settings


def smart_configuration(settings: Settings) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "issuer": settings.jwt_issuer,
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "scopes_supported": [
            "openid",
            "fhirUser",
            "launch",
            "launch/patient",
            "offline_access",
            "patient/*.cruds",
            "user/*.cruds",
            "system/*.cruds",
            "patient/*.rs",
            "user/*.rs",
            "system/*.rs",
            "patient/*.read",
            "user/*.read",
            "system/*.read",
        ],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-standalone",
            "client-public",
            "client-confidential-asymmetric",
            "context-standalone-patient",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
        ],
    }
    if settings.jwks.startswith("http"):
        doc["jwks_uri"] = settings.jwks
    if settings.smart_authorization_endpoint:
        doc["authorization_endpoint"] = settings.smart_authorization_endpoint
    if settings.smart_token_endpoint:
        doc["token_endpoint"] = settings.smart_token_endpoint
    return doc


async def smart_configuration_route(request: Request) -> Response:
    return JSONResponse(smart_configuration(request.app.state.backends.settings))
