"""The SearchParameter registry (generated from the official R5 definitions) and FHIRPath index
extraction (``subgraphs.store.registry``, ``subgraphs.store.extract``).

(a) the committed ``search_registry.json`` is exactly what ``scripts/generate_search_registry.py``
    produces from ``hl7.fhir.r5.core@5.0.0``;
(b) for every official R5 example of the in-scope types (and a slice of the demo data), for every
    parameter of its type, the extracted values equal what fhirpathpy yields evaluating the
    parameter's expression directly, converted the same way — this checks the fast path (dict walks),
    the branch splitting and the resolve() hook against the reference engine;
(c) unit cases per value type.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.demo_data import generate
from subgraphs.store import extract as X
from subgraphs.store.extract import (
    MAX_INSTANT,
    MIN_INSTANT,
    CompositeValue,
    DateValue,
    IndexValue,
    QuantityValue,
    ReferenceValue,
    StringValue,
    TokenValue,
    UriValue,
    extract,
)
from subgraphs.store.fhirjson import parse
from subgraphs.store.registry import (
    Registry,
    SearchParam,
    default_registry,
    param_from_resource,
    registry_from_json,
    restrict_expression,
    split_union,
)
from subgraphs.store.validation import SUPPORTED_TYPES
from tests.fhir_packages import package, resources

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_JSON = ROOT / "subgraphs" / "store" / "search_registry.json"

# Parameters whose expression is not a plain path, so fhirpathpy evaluates them (no fast path).
FHIRPATHPY_ONLY = {("Patient", "deceased"), ("Practitioner", "deceased")}


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "generate_search_registry", ROOT / "scripts" / "generate_search_registry.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------- (a)


def test_committed_registry_is_generated_from_the_official_package() -> None:
    script = _script()
    document = script.build_registry(package("hl7.fhir.r5.core", "5.0.0"))
    assert REGISTRY_JSON.read_text("utf-8") == script.render(document), (
        "search_registry.json is stale: run .venv/bin/python scripts/generate_search_registry.py"
    )
    assert json.loads(script.render(document)) == document
    assert set(document["types"]) == set(SUPPORTED_TYPES)


def test_registry_content() -> None:
    reg = default_registry()
    assert reg.resource_types() == tuple(sorted(SUPPORTED_TYPES))
    patient = reg.params_for("Patient")
    for code in ("_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_text", "_content", "_has"):
        assert code in patient, code
    assert patient["_id"].expression == "Patient.id"
    assert patient["_tag"].expression == "Patient.meta.tag" and patient["_tag"].type == "token"
    assert patient["_text"].type == "special"  # DomainResource-text wins over Resource-text
    assert patient["birthdate"].expression == "Patient.birthDate"
    assert "eb" in patient["birthdate"].comparators
    assert patient["name"].type == "string" and "exact" in patient["name"].modifiers
    assert patient["general-practitioner"].targets == ("Organization", "Practitioner", "PractitionerRole")
    assert "part-agree" not in patient  # an example SearchParameter of the package, not a definition
    allergy = reg.params_for("AllergyIntolerance")
    assert allergy["patient"].expression == "AllergyIntolerance.patient"
    assert allergy["code"].expression == "AllergyIntolerance.code | AllergyIntolerance.reaction.substance"
    assert allergy["date"].expression == "AllergyIntolerance.recordedDate"  # no Appointment branch
    obs = reg.params_for("Observation")
    assert obs["patient"].expression == "Observation.subject.where(resolve() is Patient)"
    assert obs["patient"].url == "http://hl7.org/fhir/SearchParameter/clinical-patient"
    cvq = obs["code-value-quantity"]
    assert cvq.type == "composite" and not cvq.multiple_or
    assert [(c.code, c.type, c.expression) for c in cvq.components] == [
        ("code", "token", "code"),
        ("value-quantity", "quantity", "value.ofType(Quantity)"),
    ]
    assert obs["combo-code-value-quantity"].expression == "Observation | Observation.component"
    assert reg.params_for("Encounter")["location-period"].components[1].type == "date"
    assert reg.params_for("Medication")["form"].expression is None  # the 5.0.0 definition has none
    assert reg.get("Patient", "nope") is None and reg.params_for("Nope") == {}


def test_restrict_expression() -> None:
    expr = "AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) | (Patient.x.ofType(dateTime))"
    assert restrict_expression(expr, "AllergyIntolerance") == "AllergyIntolerance.patient"
    assert restrict_expression(expr, "CarePlan") == "CarePlan.subject.where(resolve() is Patient)"
    assert restrict_expression(expr, "Patient") == "(Patient.x.ofType(dateTime))"
    assert restrict_expression(expr, "Medication") is None
    assert restrict_expression("Medication.code | MedicationRequest.x", "Medication") == "Medication.code"
    assert restrict_expression("Resource.meta.tag", "Consent") == "Consent.meta.tag"
    assert restrict_expression("id", "Patient") == "id"
    assert restrict_expression("A.x | (start | b).first()", "A", keep_relative=False) == "A.x"
    assert split_union("a.where(x = 'p|q') | (b | c).d | e") == ["a.where(x = 'p|q')", "(b | c).d", "e"]


def test_no_import_time_io() -> None:
    code = (
        "import sys; import subgraphs.store.extract, subgraphs.store.registry as r;"
        "assert 'fhirpathpy' not in sys.modules, 'fhirpathpy imported';"
        "assert r.default_registry.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------------------------- (b)


@cache
def _examples() -> tuple[tuple[str, dict[str, Any]], ...]:
    """The official examples as the store holds them (decimals as ``Decimal``)."""
    out = []
    for name, example in resources("hl7.fhir.r5.examples", "5.0.0", set(SUPPORTED_TYPES)):
        data = parse(json.dumps(example).encode())
        assert isinstance(data, dict)
        out.append((name, data))
    return tuple(out)


def _direct(resource: dict[str, Any], param: SearchParam) -> list[IndexValue]:
    """The parameter's expression evaluated directly by fhirpathpy, converted."""
    assert param.expression is not None
    if not param.components:
        return X.convert(param.type, X.fhirpath(resource, param.expression))
    # fhirpathpy's ``|`` drops the element types of its operands (so ``value`` of a component could
    # no longer be resolved): evaluate the composite's branches one by one, then each component.
    seen: dict[IndexValue, None] = {}
    for branch in split_union(param.expression):
        for node in X.fhirpath_nodes(resource, branch):
            parts = [X.convert(c.type or "", X.fhirpath_nodes(node, c.expression)) for c in param.components]
            seen.update(dict.fromkeys(X.combine(parts)))
    return list(seen)


def _mismatches(name: str, resource: dict[str, Any]) -> Iterator[str]:
    fast = extract(resource)
    slow = extract(resource, fast=False)
    for code, param in default_registry().params_for(resource["resourceType"]).items():
        if not X.indexable(param):
            assert code not in fast
            continue
        expected = _direct(resource, param)
        for label, got in (("fast path", fast), ("fhirpathpy", slow)):
            if list(got.get(code, ())) != expected:
                yield f"{name} {code} ({param.expression}) {label}: {got.get(code, ())} != {expected}"


@pytest.mark.parametrize("resource_type", SUPPORTED_TYPES)
def test_extraction_matches_fhirpathpy_on_official_examples(resource_type: str) -> None:
    examples = [(n, r) for n, r in _examples() if r["resourceType"] == resource_type]
    assert examples
    failures = [m for name, resource in examples for m in _mismatches(name, resource)]
    assert not failures, "\n".join(failures[:20])


def test_extraction_matches_fhirpathpy_on_demo_data() -> None:
    failures = [m for r in generate(6, 2, 11) for m in _mismatches(f"{r['resourceType']}/{r['id']}", r)]
    assert not failures, "\n".join(failures[:20])


@cache
def _official_expressions() -> dict[str, str]:
    """url → the unrestricted expression of every definition in the core package."""
    script = _script()
    return {
        sp["url"]: sp["expression"]
        for sp in script.search_parameters(package("hl7.fhir.r5.core", "5.0.0"))
        if sp.get("expression")
    }


def test_restricted_expressions_select_what_the_official_ones_do() -> None:
    """Keeping only a type's union branches loses nothing: on every example, the official
    expression (all types' branches) and the restricted one give the same values."""
    official = _official_expressions()
    failures = []
    for name, resource in _examples():
        for code, param in default_registry().params_for(resource["resourceType"]).items():
            full = official.get(param.url)
            if not X.indexable(param) or param.components or full is None or full.startswith("Resource."):
                continue
            if full == param.expression:
                continue
            assert param.expression is not None
            if X.convert(param.type, X.fhirpath(resource, full)) != _direct(resource, param):
                failures.append(f"{name} {code}")
    assert not failures, failures[:20]


def test_examples_exercise_every_kind_of_value() -> None:
    kinds: set[str] = set()
    for _, resource in _examples():
        for values in extract(resource).values():
            kinds.update(v.kind for v in values)
    assert kinds == {"string", "token", "reference", "date", "quantity", "uri", "composite"}


def test_fast_path_covers_every_plain_expression() -> None:
    reg = default_registry()
    slow = {
        (t, code)
        for t in SUPPORTED_TYPES
        for code, p in reg.params_for(t).items()
        if X.indexable(p) and not X.compile_param(p).fast
    }
    assert slow == FHIRPATHPY_ONLY


# --------------------------------------------------------------------------------------------- (c)


def _values(resource: dict[str, Any], code: str) -> tuple[IndexValue, ...]:
    return extract(resource).get(code, ())


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def test_dates_partial_timezones_periods_timing() -> None:
    patient: dict[str, Any] = {"resourceType": "Patient", "birthDate": "1974"}
    assert _values(patient, "birthdate") == (DateValue(_utc(1974, 1, 1), _utc(1974, 12, 31, 23, 59, 59, 999999)),)
    patient["birthDate"] = "1974-02"
    assert _values(patient, "birthdate") == (DateValue(_utc(1974, 2, 1), _utc(1974, 2, 28, 23, 59, 59, 999999)),)
    obs: dict[str, Any] = {"resourceType": "Observation", "effectiveDateTime": "2024-03-05T01:30:00+02:00"}
    assert _values(obs, "date") == (DateValue(_utc(2024, 3, 4, 23, 30), _utc(2024, 3, 4, 23, 30, 0, 999999)),)
    obs = {"resourceType": "Observation", "effectiveInstant": "2024-03-05T10:00:00.250Z"}
    assert _values(obs, "date") == (DateValue(_utc(2024, 3, 5, 10, 0, 0, 250000), _utc(2024, 3, 5, 10, 0, 0, 250000)),)
    obs = {"resourceType": "Observation", "effectivePeriod": {"start": "2024-03-05"}}
    assert _values(obs, "date") == (DateValue(_utc(2024, 3, 5), MAX_INSTANT),)
    obs = {"resourceType": "Observation", "effectivePeriod": {"end": "2024-03-05T10:00:00Z"}}
    assert _values(obs, "date") == (DateValue(MIN_INSTANT, _utc(2024, 3, 5, 10, 0, 0, 999999)),)
    obs = {"resourceType": "Observation", "effectiveDateTime": "not a date"}
    assert _values(obs, "date") == ()
    timing = {"event": ["2024-05-02", "2024-05-09T10:00:00Z"], "repeat": {"boundsPeriod": {"start": "2024-05-01"}}}
    obs = {"resourceType": "Observation", "effectiveTiming": timing}
    assert _values(obs, "date") == (DateValue(_utc(2024, 5, 1), MAX_INSTANT),)
    request = {
        "resourceType": "MedicationRequest",
        "dosageInstruction": [{"timing": {"event": ["2024-05-02"], "repeat": {"boundsPeriod": {"end": "2024-06"}}}}],
    }
    assert _values(request, "combo-date") == (
        DateValue(_utc(2024, 5, 2), _utc(2024, 5, 2, 23, 59, 59, 999999)),
        DateValue(MIN_INSTANT, _utc(2024, 6, 30, 23, 59, 59, 999999)),
    )


def test_quantity_precision_ranges() -> None:
    def quantity(value: Any, **extra: Any) -> tuple[IndexValue, ...]:
        q = {"value": value, "system": "http://unitsofmeasure.org", "code": "mg", "unit": "mg", **extra}
        return _values({"resourceType": "Observation", "valueQuantity": q}, "value-quantity")

    ucum = ("http://unitsofmeasure.org", "mg", "mg")
    assert quantity(Decimal("5.4")) == (QuantityValue(Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), *ucum),)
    assert quantity(Decimal("5.40")) == (QuantityValue(Decimal("5.40"), Decimal("5.395"), Decimal("5.405"), *ucum),)
    assert quantity(100) == (QuantityValue(Decimal(100), Decimal("99.5"), Decimal("100.5"), *ucum),)
    assert quantity(Decimal("1E+2")) == (QuantityValue(Decimal("1E+2"), Decimal(50), Decimal(150), *ucum),)
    assert quantity(5.4) == (QuantityValue(Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), *ucum),)  # float input
    assert quantity(Decimal("5"), comparator="<") == (QuantityValue(Decimal(5), None, Decimal(5), *ucum),)
    assert quantity(Decimal("5"), comparator=">=") == (QuantityValue(Decimal(5), Decimal(5), None, *ucum),)
    sampled = {"resourceType": "Observation", "valueSampledData": {"origin": {"value": 1}, "dimensions": 1}}
    assert _values(sampled, "value-quantity") == ()
    age = {"resourceType": "Condition", "onsetAge": {"value": 42, "system": "http://unitsofmeasure.org", "code": "a"}}
    assert _values(age, "onset-age") == (
        QuantityValue(Decimal(42), Decimal("41.5"), Decimal("42.5"), "http://unitsofmeasure.org", "a"),
    )
    rng = {"resourceType": "Condition", "onsetRange": {"low": {"value": 10, "code": "a"}, "high": {"value": 20}}}
    assert _values(rng, "onset-age") == (QuantityValue(None, Decimal(10), Decimal(20), None, "a"),)
    length = {"resourceType": "Encounter", "length": {"value": Decimal("2.5"), "unit": "h"}}
    assert _values(length, "length") == (QuantityValue(Decimal("2.5"), Decimal("2.45"), Decimal("2.55"), unit="h"),)


def test_tokens_from_every_kind_of_element() -> None:
    patient = {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "urn:fac", "code": "fac-001", "display": "Facility 1"}]},
        "identifier": [
            {
                "system": "urn:mrn",
                "value": "123",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            },
            {"value": "no-system"},
        ],
        "telecom": [
            {"system": "phone", "value": "+1 555 0100", "use": "home"},
            {"system": "email", "value": "ann@example.org"},
        ],
        "gender": "female",
        "active": False,
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "fr"}], "text": "French"}}],
    }
    assert _values(patient, "_tag") == (TokenValue("urn:fac", "fac-001", "Facility 1"),)
    assert _values(patient, "identifier") == (
        TokenValue("urn:mrn", "123", None, (("http://terminology.hl7.org/CodeSystem/v2-0203", "MR"),)),
        TokenValue(None, "no-system"),
    )
    assert _values(patient, "telecom") == (TokenValue(None, "+1 555 0100"), TokenValue(None, "ann@example.org"))
    assert _values(patient, "phone") == (TokenValue(None, "+1 555 0100"),)
    assert _values(patient, "email") == (TokenValue(None, "ann@example.org"),)
    assert _values(patient, "gender") == (TokenValue(None, "female"),)
    assert _values(patient, "active") == (TokenValue(None, "false"),)
    assert _values(patient, "deceased") == (TokenValue(None, "false"),)  # the spec's expression says so
    assert _values(patient, "language") == (TokenValue("urn:ietf:bcp:47", "fr"), TokenValue(None, None, "French"))
    patient["deceasedDateTime"] = "2020-01-01"
    assert _values(patient, "deceased") == (TokenValue(None, "true"),)
    assert _values(patient, "death-date")[0] == DateValue(_utc(2020, 1, 1), _utc(2020, 1, 1, 23, 59, 59, 999999))
    assert _values(patient, "_id") == ()
    patient["id"] = "p1"
    assert _values(patient, "_id") == (TokenValue(None, "p1"),)


def test_references() -> None:
    obs = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "http://example.org/fhir/Encounter/e1/_history/3"},
        "performer": [
            {"reference": "#contained"},
            {"reference": "Practitioner/dr"},
            {"identifier": {"system": "urn:npi", "value": "42"}, "type": "Practitioner"},
            {"display": "only a name"},
        ],
        "basedOn": [{"reference": "urn:uuid:9b3e0000-0000-4000-8000-000000000000"}],
        "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns|5.0.0"]},
    }
    assert _values(obs, "patient") == (ReferenceValue("Patient", "p1"),)
    assert _values(obs, "subject") == (ReferenceValue("Patient", "p1"),)
    assert _values(obs, "encounter") == (
        ReferenceValue("Encounter", "e1", "3", "http://example.org/fhir/Encounter/e1"),
    )
    assert _values(obs, "performer") == (
        ReferenceValue("Practitioner", "dr"),
        ReferenceValue("Practitioner", None, identifier_system="urn:npi", identifier_value="42"),
    )
    assert _values(obs, "based-on") == (
        ReferenceValue(None, None, url="urn:uuid:9b3e0000-0000-4000-8000-000000000000"),
    )
    assert _values(obs, "_profile") == (
        ReferenceValue(
            "StructureDefinition", "vitalsigns", "5.0.0", "http://hl7.org/fhir/StructureDefinition/vitalsigns"
        ),
    )
    group = {"resourceType": "Observation", "subject": {"reference": "Group/g1"}}
    assert _values(group, "patient") == ()  # resolve() is Patient filters by the reference's type
    assert _values(group, "subject") == (ReferenceValue("Group", "g1"),)
    typed = {"resourceType": "Observation", "subject": {"identifier": {"value": "x"}, "type": "Patient"}}
    assert _values(typed, "patient") == (ReferenceValue("Patient", None, identifier_value="x"),)
    encounter = {
        "resourceType": "Encounter",
        "participant": [{"actor": {"reference": "Practitioner/a"}}, {"actor": {"reference": "RelatedPerson/b"}}],
    }
    assert _values(encounter, "practitioner") == (ReferenceValue("Practitioner", "a"),)
    assert len(_values(encounter, "participant")) == 2


def test_composites() -> None:
    loinc = "http://loinc.org"
    bp = {
        "resourceType": "Observation",
        "code": {"coding": [{"system": loinc, "code": "85354-9"}], "text": "Blood pressure"},
        "component": [
            {
                "code": {"coding": [{"system": loinc, "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": loinc, "code": "8462-4"}]},
                "valueQuantity": {"value": Decimal("80.5"), "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            },
        ],
    }
    systolic = QuantityValue(Decimal(120), Decimal("119.5"), Decimal("120.5"), "http://unitsofmeasure.org", "mm[Hg]")
    diastolic = QuantityValue(
        Decimal("80.5"), Decimal("80.45"), Decimal("80.55"), "http://unitsofmeasure.org", "mm[Hg]"
    )
    assert _values(bp, "component-code-value-quantity") == (
        CompositeValue((TokenValue(loinc, "8480-6"), systolic)),
        CompositeValue((TokenValue(loinc, "8462-4"), diastolic)),
    )
    assert _values(bp, "code-value-quantity") == ()  # no value of its own
    assert _values(bp, "combo-code-value-quantity") == _values(bp, "component-code-value-quantity")
    glucose = {
        "resourceType": "Observation",
        "code": {"coding": [{"system": loinc, "code": "2339-0", "display": "Glucose"}], "text": "Glucose"},
        "valueQuantity": {"value": Decimal("5.4"), "unit": "mmol/L"},
    }
    assert _values(glucose, "code-value-quantity") == (
        CompositeValue(
            (
                TokenValue(loinc, "2339-0", "Glucose"),
                QuantityValue(Decimal("5.4"), Decimal("5.35"), Decimal("5.45"), unit="mmol/L"),
            )
        ),
    )
    located = {
        "resourceType": "Encounter",
        "location": [{"location": {"reference": "Location/l1"}, "period": {"start": "2024-01-01"}}],
    }
    assert _values(located, "location-period") == (
        CompositeValue((ReferenceValue("Location", "l1"), DateValue(_utc(2024, 1, 1), MAX_INSTANT))),
    )


def test_strings_are_normalized_and_exact() -> None:
    patient = {
        "resourceType": "Patient",
        "name": [{"family": "Müller", "given": ["Ånne", "Zoë"], "prefix": ["Dr."], "text": "Dr. Ånne Müller"}],
        "address": [{"line": ["1 Rue de l'Église"], "city": "Besançon", "postalCode": "25000", "use": "home"}],
    }
    assert _values(patient, "family") == (StringValue("Müller", "muller"),)
    assert [v.normalized for v in _values(patient, "name") if isinstance(v, StringValue)] == [
        "dr. anne muller",
        "muller",
        "anne",
        "zoe",
        "dr.",
    ]
    assert _values(patient, "address-city") == (StringValue("Besançon", "besancon"),)
    assert [v.exact for v in _values(patient, "address") if isinstance(v, StringValue)] == [
        "1 Rue de l'Église",
        "Besançon",
        "25000",
    ]
    assert _values(patient, "address-use") == (TokenValue(None, "home"),)
    assert X.normalize("STRASSE ß Ǆ Øre") == "strasse ss dz øre"  # Ø has no decomposition


def test_normalize_ascii_fast_path_equals_the_unicode_path() -> None:
    """ASCII text skips NFKD and the combining-mark walk; the result must be the same."""
    import unicodedata

    def slow(text: str) -> str:
        return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()

    samples = ["", "Smith", "O'BRIEN-Jones", "  Mixed Case 123 \t\n", "a_b|c~d{}", "".join(map(chr, range(128)))]
    for text in samples:
        assert text.isascii() and X.normalize(text) == slow(text)
    for text in ("Zoë", "ﬁle", "Ǆ", "Ω", "e\u0301"):  # non-ASCII still takes the Unicode path
        assert X.normalize(text) == slow(text)


def test_uris() -> None:
    event = {"resourceType": "AuditEvent", "meta": {"source": "urn:src"}, "agent": [{"policy": ["http://x/p|1"]}]}
    assert _values(event, "_source") == (UriValue("urn:src"),)
    assert _values(event, "policy") == (UriValue("http://x/p|1"),)
    # R5 Observation.value[x] has no canonical choice: value-canonical never has values
    obs = {"resourceType": "Observation", "valueCanonical": "http://x/Q|1"}
    assert _values(obs, "value-canonical") == ()


# --------------------------------------------------------------------------------------------- custom


def test_custom_search_parameter_is_indexed_from_then_on() -> None:
    reg = registry_from_json(json.loads(REGISTRY_JSON.read_text("utf-8")))
    patient = {"resourceType": "Patient", "birthDate": "1970", "extension": [{"url": "urn:eye", "valueString": "Blue"}]}
    assert "eye-colour" not in extract(patient, reg)
    custom = param_from_resource(
        {
            "resourceType": "SearchParameter",
            "url": "http://example.org/SearchParameter/eye-colour",
            "code": "eye-colour",
            "base": ["Patient", "Practitioner"],
            "type": "string",
            "expression": "Patient.extension('urn:eye').value | Practitioner.extension('urn:eye').value",
        },
        reg,
    )
    generation = reg.generation
    reg.add(custom)
    assert reg.generation == generation + 1
    assert reg.params_for("Patient")["eye-colour"].expression == "Patient.extension('urn:eye').value"
    assert extract(patient, reg)["eye-colour"] == (StringValue("Blue", "blue"),)
    assert extract(patient, reg, fast=False)["eye-colour"] == (StringValue("Blue", "blue"),)
    assert "eye-colour" not in reg.params_for("Observation")
    assert "eye-colour" not in default_registry().params_for("Patient")  # registries are independent
    with pytest.raises(ValueError):
        reg.add(SearchParam("bad code!", "string", "Patient.name", url="urn:x", base=("Patient",)))
    with pytest.raises(ValueError):
        param_from_resource({"resourceType": "SearchParameter", "code": "x"}, reg)


def test_registry_add_overrides_builtin_for_its_base() -> None:
    reg = Registry({"Patient": {}}, {})
    reg.add(SearchParam("name", "string", "Patient.name.family", url="urn:n", base=("Patient",)))
    patient = {"resourceType": "Patient", "name": [{"family": "Doe", "given": ["J"]}]}
    assert extract(patient, reg) == {"name": (StringValue("Doe", "doe"),)}


def test_numbers() -> None:
    assert X.convert("number", [3, Decimal("0.50"), "9007199254740993", True, "x"]) == [
        X.NumberValue(Decimal(3), Decimal("2.5"), Decimal("3.5")),
        X.NumberValue(Decimal("0.50"), Decimal("0.495"), Decimal("0.505")),
        X.NumberValue(Decimal("9007199254740993"), Decimal("9007199254740992.5"), Decimal("9007199254740993.5")),
    ]


def test_basic_rows_fit_the_foundation_tables() -> None:
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Heart rate"},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-01-01",
        "valueQuantity": {"value": 72},
    }
    rows = list(X.basic_rows(obs))
    assert ("token", {"param": "code", "system": "http://loinc.org", "code": "8867-4"}) in rows
    assert ("reference", {"param": "patient", "target_type": "Patient", "target_id": "p1"}) in rows
    assert ("date", {"param": "date", "low": _utc(2024, 1, 1), "high": _utc(2024, 1, 1, 23, 59, 59, 999999)}) in rows
    assert ("token", {"param": "_id", "system": None, "code": "o1"}) in rows
    assert {kind for kind, _ in rows} == {"token", "reference", "date"}
    assert all(row.get("code") for kind, row in rows if kind == "token")
    assert len(rows) == len({(k, *r.values()) for k, r in rows})
