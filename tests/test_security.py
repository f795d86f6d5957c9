"""Authentication and authorization: token attacks, roles, SMART scopes compiled into SQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.security.tokens import mint
from gateway.settings import SettingsError, load_settings
from tests.conftest import token_for
from tests.helpers import assert_outcome, create, observation, patient


def _pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    jwks = {"keys": []}
    for kid, key, alg in (("rsa1", rsa_key, "RS256"), ("ec256", p256, "ES256"), ("ec384", p384, "ES384")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        jwks["keys"].append({**jwk, "kid": kid, "use": "sig"})
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps(jwks))
    rsa_public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "path": str(path),
        "rsa": _pem(rsa_key),
        "p256": _pem(p256),
        "p384": _pem(p384),
        "rsa_public": rsa_public_pem,
    }


@pytest.fixture(scope="module")
async def jwks_app(backend: str, settings_for: Any, keys: dict[str, Any]) -> AsyncIterator[Starlette]:
    application = create_app(settings_for(backend, jwks=keys["path"]))
    async with application.router.lifespan_context(application):
        yield application


def _client(app: Starlette, facility: str, token: str | None) -> httpx.AsyncClient:
    headers = {"X-Facility-Id": facility, "Content-Type": "application/fhir+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir/r5", headers=headers)


def _claims(settings: Any, facility: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": "attacker",
        "iat": now,
        "exp": now + 600,
        "facilities": [facility],
        "roles": ["admin"],
        "scope": "user/*.cruds",
        **extra,
    }


async def test_asymmetric_tokens_from_jwks(jwks_app: Starlette, keys: dict[str, Any], facility: str) -> None:
    settings = jwks_app.state.backends.settings
    for kid, pem, alg in (
        ("rsa1", keys["rsa"], "RS256"),
        ("ec256", keys["p256"], "ES256"),
        ("ec384", keys["p384"], "ES384"),
    ):
        token = mint(settings, facilities=[facility], roles=["clinician"], private_key=pem, kid=kid, algorithm=alg)
        async with _client(jwks_app, facility, token) as c:
            r = await c.get("/Patient")
            assert r.status_code == 200, (alg, r.text)


async def test_token_attacks_are_rejected(jwks_app: Starlette, keys: dict[str, Any], facility: str) -> None:
    settings = jwks_app.state.backends.settings
    good = mint(
        settings, facilities=[facility], roles=["admin"], private_key=keys["rsa"], kid="rsa1", algorithm="RS256"
    )
    header, payload, signature = good.split(".")
    unsigned = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    tampered_payload = (
        base64.urlsafe_b64encode(json.dumps(_claims(settings, facility, sub="someone-else")).encode())
        .rstrip(b"=")
        .decode()
    )
    # HS256 signed with the RSA *public* key as the HMAC secret (algorithm confusion)
    hs_header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": "rsa1"}).encode()).rstrip(b"=").decode()
    signing_input = f"{hs_header}.{payload}"
    mac = hmac.new(keys["rsa_public"], signing_input.encode(), hashlib.sha256).digest()
    confusion = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    now = int(time.time())
    attacks = {
        "alg none": f"{unsigned}.{payload}.",
        "HS256 with the RSA public key": confusion,
        "HS256 dev key in a JWKS setup is still embedded-only": None,
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "expired": mint(
            settings, facilities=[facility], roles=["admin"], private_key=keys["rsa"], kid="rsa1", lifetime=-120
        ),
        "not yet valid": jwt.encode(
            _claims(settings, facility, nbf=now + 600), keys["rsa"], algorithm="RS256", headers={"kid": "rsa1"}
        ),
        "wrong audience": jwt.encode(
            _claims(settings, facility, aud="someone-else"), keys["rsa"], algorithm="RS256", headers={"kid": "rsa1"}
        ),
        "wrong issuer": jwt.encode(
            _claims(settings, facility, iss="https://evil.example"),
            keys["rsa"],
            algorithm="RS256",
            headers={"kid": "rsa1"},
        ),
        "EC key for an RS256 header": jwt.encode(
            _claims(settings, facility), keys["p256"], algorithm="ES256", headers={"kid": "rsa1"}
        ),
        "unknown kid": jwt.encode(_claims(settings, facility), keys["rsa"], algorithm="RS256", headers={"kid": "nope"}),
        "not a JWT": "hello",
        "no facility claim": jwt.encode(
            {**_claims(settings, facility), "facilities": []}, keys["rsa"], algorithm="RS256", headers={"kid": "rsa1"}
        ),
    }
    attacks = {k: v for k, v in attacks.items() if v is not None}
    async with _client(jwks_app, facility, None) as c:
        assert_outcome(await c.get("/Patient"), 401, "login")
        for name, token in attacks.items():
            r = await c.get("/Patient", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, (name, r.status_code, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer"), name
            assert_outcome(r, 401, "login")
        ok = await c.get("/Patient", headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200


def test_production_refuses_hs256(tmp_path: Path) -> None:
    env = {
        "UNIHEALTH_PROFILE": "production",
        "UNIHEALTH_DATABASE_URL": "postgresql+asyncpg://x@127.0.0.1/db",
        "UNIHEALTH_SECRET_KEY": "s" * 40,
    }
    with pytest.raises(SettingsError, match="UNIHEALTH_JWKS"):
        load_settings(env, data_dir=tmp_path)
    with pytest.raises(SettingsError, match="refused"):
        load_settings({**env, "UNIHEALTH_JWKS": "/x.json", "UNIHEALTH_DEV_JWT_KEY": "k" * 40}, data_dir=tmp_path)
    assert load_settings({**env, "UNIHEALTH_JWKS": "/x.json"}, data_dir=tmp_path).dev_jwt_key == b""


async def test_facility_must_be_in_the_token(app: Starlette, facility: str) -> None:
    token = token_for(app.state.backends.settings, [facility])
    async with _client(app, facility + "-elsewhere", token) as c:
        assert_outcome(await c.get("/Patient"), 403, "forbidden")
        assert_outcome(await c.post("/Patient", json=patient()), 403, "forbidden")


async def test_roles(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    settings = app.state.backends.settings
    pid = (await create(client, patient()))["id"]
    await create(client, observation(pid))
    med = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medication": {"concept": {"text": "x"}},
        "subject": {"reference": f"Patient/{pid}"},
    }
    audit = {
        "resourceType": "AuditEvent",
        "code": {"text": "read"},
        "recorded": "2024-01-01T00:00:00Z",
        "agent": [{"who": {"display": "x"}}],
        "source": {"observer": {"display": "x"}},
    }
    await create(client, audit)

    def as_role(role: str) -> httpx.AsyncClient:
        return _client(app, facility, token_for(settings, [facility], roles=[role]))

    async with as_role("nurse") as nurse:
        assert (await nurse.get(f"/Patient/{pid}/summary")).status_code == 200
        assert (await nurse.post("/Observation", json=observation(pid))).status_code == 201
        assert_outcome(await nurse.post("/MedicationRequest", json=med), 403, "forbidden")
        assert_outcome(await nurse.delete(f"/Patient/{pid}"), 403, "forbidden")
    async with as_role("clinician") as clinician:
        assert (await clinician.post("/MedicationRequest", json=med)).status_code == 201
        assert_outcome(await clinician.get("/AuditEvent"), 403, "forbidden")
    async with as_role("auditor") as auditor:
        assert len((await auditor.get("/AuditEvent")).json()["entry"]) == 1
        assert_outcome(await auditor.get(f"/Patient/{pid}"), 403, "forbidden")
    async with as_role("registrar") as registrar:
        assert (await registrar.get(f"/Patient/{pid}")).status_code == 200
        assert_outcome(await registrar.get("/Observation"), 403, "forbidden")
    async with as_role("admin") as admin:
        assert_outcome(await admin.get("/AuditEvent"), 403, "forbidden")


async def test_patient_scopes_restrict_to_the_compartment(
    app: Starlette, client: httpx.AsyncClient, facility: str
) -> None:
    settings = app.state.backends.settings
    me = (await create(client, patient("Me")))["id"]
    other = (await create(client, patient("Other")))["id"]
    mine = (await create(client, observation(me)))["id"]
    theirs = (await create(client, observation(other)))["id"]
    token = token_for(
        settings,
        [facility],
        roles=["clinician"],
        patient=me,
        scopes=["patient/Patient.rs", "patient/Observation.rs", "patient/Encounter.rs"],
    )
    async with _client(app, facility, token) as c:
        assert (await c.get(f"/Patient/{me}")).status_code == 200
        assert_outcome(await c.get(f"/Patient/{other}"), 404, "not-found")
        assert (await c.get(f"/Observation/{mine}")).status_code == 200
        assert_outcome(await c.get(f"/Observation/{theirs}"), 404, "not-found")
        assert_outcome(await c.get(f"/Observation/{theirs}/_history/1"), 404)
        found = (await c.get("/Observation", params={"code": "8867-4", "_total": "accurate"})).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [mine] and found["total"] == 1
        assert (await c.get("/Observation", params={"_summary": "count"})).json()["total"] == 1
        assert_outcome(await c.get(f"/Patient/{other}/summary"), 404)
        summary = (await c.get(f"/Patient/{me}/summary")).json()
        types = {e["resource"]["resourceType"] for e in summary["entry"]}
        assert types == {"Patient", "Observation"}, "sections without a grant are left out"
        assert_outcome(await c.post("/Observation", json=observation(me)), 403, "forbidden")
        assert_outcome(await c.get("/Observation/_history"), 403, "forbidden")
    write = token_for(settings, [facility], roles=["clinician"], patient=me, scopes=["patient/Observation.crus"])
    async with _client(app, facility, write) as c:
        assert (await c.post("/Observation", json=observation(me))).status_code == 201
        before = (await client.get("/Observation", params={"patient": other, "_summary": "count"})).json()["total"]
        assert_outcome(await c.post("/Observation", json=observation(other)), 403, "forbidden")
        assert_outcome(await c.put(f"/Observation/{theirs}", json=observation(other, id=theirs)), 403)
        after = (await client.get("/Observation", params={"patient": other, "_summary": "count"})).json()["total"]
        assert before == after, "a refused write stores nothing"
        moved = observation(other, id=mine)
        assert_outcome(await c.put(f"/Observation/{mine}", json=moved), 403, "forbidden")
        assert (await client.get(f"/Observation/{mine}")).json()["subject"]["reference"] == f"Patient/{me}"


async def test_query_constrained_scopes(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    settings = app.state.backends.settings
    pid = (await create(client, patient()))["id"]
    lab = (await create(client, observation(pid, code="4548-4", category="laboratory")))["id"]
    vital = (await create(client, observation(pid)))["id"]
    token = token_for(
        settings, [facility], roles=["clinician"], scopes=["user/Observation.rs?category=laboratory", "user/Patient.rs"]
    )
    async with _client(app, facility, token) as c:
        assert (await c.get(f"/Observation/{lab}")).status_code == 200
        assert_outcome(await c.get(f"/Observation/{vital}"), 404)
        r = (await c.get("/Observation", params={"patient": pid})).json()
        assert [e["resource"]["id"] for e in r["entry"]] == [lab]
        assert (await c.get("/Observation", params={"patient": pid, "_summary": "count"})).json()["total"] == 1
        obs = (await c.get(f"/Patient/{pid}/observations")).json()
        assert [e["resource"]["id"] for e in obs["entry"]] == [lab]
    writer = token_for(settings, [facility], roles=["clinician"], scopes=["user/Observation.crus?category=vital-signs"])
    async with _client(app, facility, writer) as c:
        assert (await c.post("/Observation", json=observation(pid))).status_code == 201
        assert_outcome(await c.post("/Observation", json=observation(pid, category="laboratory")), 403)
        assert_outcome(await c.put(f"/Observation/{lab}", json=observation(pid, id=lab)), 403)


async def test_bundle_entries_are_checked_one_by_one(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient()))["id"]
    nurse = token_for(app.state.backends.settings, [facility], roles=["nurse"])
    med = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medication": {"concept": {"text": "x"}},
        "subject": {"reference": f"Patient/{pid}"},
    }
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": observation(pid), "request": {"method": "POST", "url": "Observation"}},
            {"resource": med, "request": {"method": "POST", "url": "MedicationRequest"}},
        ],
    }
    async with _client(app, facility, nurse) as c:
        out = (await c.post("/", json=batch)).json()
        assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "403"]
        transaction = {**batch, "type": "transaction"}
        assert_outcome(await c.post("/", json=transaction), 403, "forbidden")
    count = (await client.get("/Observation", params={"patient": pid, "_summary": "count"})).json()["total"]
    assert count == 1, "the refused transaction wrote nothing"


async def test_smart_configuration(app: Starlette) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in ("/.well-known/smart-configuration", "/fhir/r5/.well-known/smart-configuration"):
            doc = (await c.get(path)).json()
            assert doc["issuer"] == app.state.backends.settings.jwt_issuer
            assert {"permission-v2", "permission-v1", "permission-patient"} <= set(doc["capabilities"])


def test_policies_and_access_levels_are_memoized_per_principal() -> None:
    """Every request of one token derives the same policy object and computes its fingerprint once;
    different claims never share one (the memo is keyed by the whole frozen principal)."""
    from gateway.security.policy import _access_level, access_level, policy_for
    from gateway.security.scopes import parse_scope
    from gateway.security.tokens import Principal

    def principal(*scopes: str, subject: str = "dr") -> Principal:
        parsed = tuple(s for s in (parse_scope(t) for t in scopes) if s is not None)
        return Principal(subject, ("clinician",), ("fac-001",), parsed)

    wide = principal("user/*.rs")
    assert policy_for(wide) is policy_for(principal("user/*.rs")), "equal claims: the same policy object"
    labs = principal("user/Patient.rs", "user/Observation.rs?category=laboratory")
    assert policy_for(labs) is not policy_for(wide)
    assert access_level(policy_for(labs)) != access_level(policy_for(wide))
    assert access_level(policy_for(wide)) == _access_level(policy_for(wide)), "the memo returns what it computes"
    assert policy_for(principal("user/*.rs", subject="other")).label != policy_for(wide).label
