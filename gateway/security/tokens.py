"""Bearer tokens: verification (pyjwt) into a :class:`Principal`, and development minting.

Contract of :class:`TokenVerifier.verify`:
* accepts RS256, ES256 and ES384 tokens signed by a key of the configured JWKS (file or https
  URL), the key chosen by ``kid`` and required to match the algorithm's key type (an RSA key never
  verifies an EC or HMAC token, and vice versa: no algorithm confusion);
* accepts HS256 only with the embedded profile's per-install development key;
* rejects ``alg: none`` and every other algorithm; checks signature, ``iss``, ``aud``, ``exp`` and
  ``nbf`` (30 s leeway) and requires ``sub``, ``exp`` and at least one facility;
* raises :class:`FhirError` 401 (``login``) for any failure, with a one-line reason.

Claims: ``sub``; ``facilities`` (list) or ``facility``; ``roles`` (list) or ``role``; ``scope``
(space-separated SMART scopes); optional ``patient`` (launch patient id) and ``purpose_of_use``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from gateway.settings import Settings
from subgraphs.store.errors import FhirError

from .roles import ROLES
from .scopes import Scope, parse_scopes

ASYMMETRIC = {"RS256": "RSA", "ES256": "EC:P-256", "ES384": "EC:P-384"}
LEEWAY = 30
CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    roles: tuple[str, ...]
    facilities: tuple[str, ...]
    scopes: tuple[Scope, ...]
    patient: str | None = None
    purpose_of_use: str | None = None
    token_id: str | None = None


def unauthorized(reason: str) -> FhirError:
    return FhirError(
        401,
        "login",
        f"invalid access token: {reason}",
        headers={"WWW-Authenticate": f'Bearer realm="unihealth", error="invalid_token", error_description="{reason}"'},
    )


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._jwks: PyJWKSet | None = None
        self._jwks_client: jwt.PyJWKClient | None = None
        if settings.jwks.startswith("https://") or settings.jwks.startswith("http://"):
            self._jwks_client = jwt.PyJWKClient(settings.jwks, cache_keys=True, lifespan=300)
        elif settings.jwks:
            self._jwks = PyJWKSet.from_dict(json.loads(Path(settings.jwks).read_text()))

    def _key_for(self, header: dict[str, Any], token: str) -> Any:
        alg = header.get("alg")
        if alg == "HS256":
            if not self.settings.dev_jwt_key or self.settings.profile != "embedded":
                raise unauthorized("HS256 tokens are accepted only by the embedded development profile")
            return self.settings.dev_jwt_key
        if alg not in ASYMMETRIC:
            raise unauthorized(f"algorithm {str(alg)[:10]!r} is not accepted")
        jwk: PyJWK
        if self._jwks_client is not None:
            try:
                jwk = self._jwks_client.get_signing_key_from_jwt(token)
            except jwt.PyJWKClientError as exc:
                raise unauthorized(f"no signing key: {exc}") from None
        elif self._jwks is not None:
            kid = header.get("kid")
            candidates = [k for k in self._jwks.keys if kid is None or k.key_id == kid]
            if len(candidates) != 1:
                raise unauthorized("no unique signing key for this kid")
            jwk = candidates[0]
        else:
            raise unauthorized("no JWKS is configured")
        kty = f"EC:{_curve(jwk)}" if jwk.key_type == "EC" else jwk.key_type
        if kty != ASYMMETRIC[alg]:
            raise unauthorized(f"the key for kid {header.get('kid')!r} cannot verify {alg}")
        return jwk.key

    def verify(self, token: str) -> Principal:
        """The token's principal (see the module contract). Verified tokens are remembered until
        they expire (at most :data:`CACHE_SIZE`), so a client reusing its token is not re-verified
        on every request; expiry is still checked on every use."""
        cached = self._cache.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires + LEEWAY:
                return principal
            del self._cache[token]
        principal, expires = self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("not a JWT") from None
        key = self._key_for(header, token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("expired") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("not yet valid") from None
        except jwt.InvalidAudienceError:
            raise unauthorized("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise unauthorized("wrong issuer") from None
        except jwt.PyJWTError as exc:
            raise unauthorized(type(exc).__name__) from None
        return principal_from_claims(claims), float(claims["exp"])


def _curve(jwk: PyJWK) -> str:
    crv = getattr(jwk.key, "curve", None)
    name = getattr(crv, "name", "")
    return {"secp256r1": "P-256", "secp384r1": "P-384"}.get(name, name)


def _strings(claims: dict[str, Any], plural: str, singular: str) -> tuple[str, ...]:
    value = claims.get(plural, claims.get(singular, []))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise unauthorized(f"claim {plural} must be a list of strings")
    return tuple(value)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    facilities = _strings(claims, "facilities", "facility")
    if not facilities:
        raise unauthorized("the token names no facility")
    roles = tuple(r for r in _strings(claims, "roles", "role") if r in ROLES)
    try:
        scopes = parse_scopes(str(claims.get("scope", "")))
    except ValueError as exc:
        raise unauthorized(str(exc)) from None
    patient = claims.get("patient")
    purpose = claims.get("purpose_of_use")
    return Principal(
        subject=str(claims["sub"]),
        roles=roles,
        facilities=facilities,
        scopes=scopes,
        patient=str(patient) if patient else None,
        purpose_of_use=str(purpose) if purpose else None,
        token_id=str(claims.get("jti")) if claims.get("jti") else None,
    )


def mint(
    settings: Settings,
    *,
    facilities: list[str],
    roles: list[str],
    scopes: list[str] | None = None,
    subject: str | None = None,
    patient: str | None = None,
    purpose_of_use: str | None = None,
    lifetime: int = 3600,
    private_key: str | None = None,
    kid: str | None = None,
    algorithm: str = "RS256",
    extra: dict[str, Any] | None = None,
) -> str:
    """A signed access token: HS256 with the development key, or ``algorithm`` (RS256, ES256, ES384)
    with ``private_key``."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": subject or f"{roles[0]}@{facilities[0]}",
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "jti": str(uuid.uuid4()),
        "facilities": facilities,
        "roles": roles,
        "scope": " ".join(scopes or ["user/*.cruds"]),
    }
    if patient:
        claims["patient"] = patient
    if purpose_of_use:
        claims["purpose_of_use"] = purpose_of_use
    claims.update(extra or {})
    if private_key is None:
        if not settings.dev_jwt_key:
            raise ValueError("no development key: pass a private key (the production profile has no HS256 key)")
        return jwt.encode(claims, settings.dev_jwt_key, algorithm="HS256")
    return jwt.encode(claims, private_key, algorithm=algorithm, headers={"kid": kid} if kid else None)
