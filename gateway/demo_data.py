"""Deterministic synthetic FHIR R5 demo data (demos and patient-summary benchmarks).

Contract
--------
``facility_ids(count)``
    ``["fac-001", "fac-002", ...]`` -- the facility ids used by the generator.

``generate(patients, facilities, seed)``
    Lazily yields plain JSON-ready ``dict`` resources, each valid against the ``fhir.resources``
    R5 model of its ``resourceType``. Order: one Organization per facility, then 3-6 Practitioners
    per facility, then per patient (patient *i* belongs to facility ``i % facilities``): the Patient,
    its Encounters (each followed by its vital-sign and laboratory Observations), Conditions,
    AllergyIntolerances (~30 % of patients) and MedicationRequests. About 35 resources per patient.

Guarantees
    * Same arguments -> identical output (byte-identical NDJSON). All randomness comes from one
      ``random.Random(seed)``; ids are UUIDv4 strings drawn from it; dates are relative to the fixed
      ``ANCHOR`` (2026-01-01), never the current time. Nothing is ever dated on/after ``ANCHOR``.
    * Every resource has a client-assigned ``id`` and exactly one ``meta.tag`` entry
      ``{"system": FACILITY_TAG_SYSTEM, "code": <facility id>}``; all resources of a patient carry
      the patient's facility.
    * References are relative (``"Patient/<id>"``) and always point to a resource yielded
      *earlier* in the stream, so the output can be loaded in order.
    * Patients have a unique national id (``NATIONAL_ID_SYSTEM``) and an MRN unique within their
      facility (``mrn_system(facility)``).

``write_ndjson(path, patients, facilities, seed, progress=None)``
    Streams ``generate(...)`` to ``path`` as NDJSON (orjson, one resource per line, constant memory)
    and returns the number of resources written. ``progress`` (if given) receives *increments*: it is
    called with the number of resources written since its previous call, every ``PROGRESS_EVERY``
    resources and once for the remainder, so the calls sum to the total (``tqdm.update``-compatible).
"""

from __future__ import annotations

import math
import random
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, NamedTuple

import orjson

__all__ = [
    "ANCHOR",
    "FACILITY_TAG_SYSTEM",
    "NATIONAL_ID_SYSTEM",
    "PROGRESS_EVERY",
    "facility_ids",
    "generate",
    "mrn_system",
    "write_ndjson",
]

Resource = dict[str, Any]

# --------------------------------------------------------------------------- systems & constants

FACILITY_TAG_SYSTEM: Final = "https://unihealth.dev/fhir/CodeSystem/facility"
NATIONAL_ID_SYSTEM: Final = "https://unihealth.dev/fhir/sid/national-id"
MRN_SYSTEM_PREFIX: Final = "https://unihealth.dev/fhir/sid/mrn/"
FACILITY_ID_SYSTEM: Final = "https://unihealth.dev/fhir/sid/facility"
STAFF_ID_SYSTEM: Final = "https://unihealth.dev/fhir/sid/staff"

ANCHOR: Final = datetime(2026, 1, 1)
HISTORY: Final = timedelta(days=5 * 365)  # encounters happen within 5 years before ANCHOR
PROGRESS_EVERY: Final = 10_000

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
OBS_CATEGORY = TERMINOLOGY + "observation-category"
OBS_INTERPRETATION = TERMINOLOGY + "v3-ObservationInterpretation"
ACT_CODE = TERMINOLOGY + "v3-ActCode"
ACT_PRIORITY = TERMINOLOGY + "v3-ActPriority"
PARTICIPATION_TYPE = TERMINOLOGY + "v3-ParticipationType"
MARITAL_STATUS = TERMINOLOGY + "v3-MaritalStatus"
IDENTIFIER_TYPE = TERMINOLOGY + "v2-0203"
ORG_TYPE = TERMINOLOGY + "organization-type"
CONDITION_CLINICAL = TERMINOLOGY + "condition-clinical"
CONDITION_VERIFICATION = TERMINOLOGY + "condition-ver-status"
CONDITION_CATEGORY = TERMINOLOGY + "condition-category"
ALLERGY_CLINICAL = TERMINOLOGY + "allergyintolerance-clinical"
ALLERGY_VERIFICATION = TERMINOLOGY + "allergyintolerance-verification"
ALLERGY_TYPE = "http://hl7.org/fhir/allergy-intolerance-type"
COURSE_OF_THERAPY = TERMINOLOGY + "medicationrequest-course-of-therapy"
BCP47 = "urn:ietf:bcp:47"

# --------------------------------------------------------------------------- data tables


class City(NamedTuple):
    name: str
    state: str
    postal: str
    country: str
    tz: str  # fixed UTC offset used for all timestamps of the facility
    lang: str
    lang_display: str
    phone: str


CITIES: Final = (
    City("Boston", "MA", "02115", "US", "-05:00", "en", "English", "+1 617"),
    City("Chicago", "IL", "60601", "US", "-06:00", "en", "English", "+1 312"),
    City("Denver", "CO", "80202", "US", "-07:00", "en", "English", "+1 303"),
    City("Seattle", "WA", "98101", "US", "-08:00", "en", "English", "+1 206"),
    City("Toronto", "ON", "M5V 2T6", "CA", "-05:00", "en", "English", "+1 416"),
    City("Dublin", "Leinster", "D02 X285", "IE", "+00:00", "en", "English", "+353 1"),
    City("Lisbon", "Lisboa", "1100-148", "PT", "+00:00", "pt", "Portuguese", "+351 21"),
    City("Madrid", "Madrid", "28013", "ES", "+01:00", "es", "Spanish", "+34 91"),
    City("Berlin", "Berlin", "10117", "DE", "+01:00", "de", "German", "+49 30"),
    City("Helsinki", "Uusimaa", "00100", "FI", "+02:00", "fi", "Finnish", "+358 9"),
    City("Athens", "Attica", "105 57", "GR", "+02:00", "el", "Greek", "+30 21"),
    City("Mumbai", "MH", "400001", "IN", "+05:30", "en", "English", "+91 22"),
    City("Singapore", "Singapore", "018956", "SG", "+08:00", "en", "English", "+65 6"),
    City("Auckland", "Auckland", "1010", "NZ", "+12:00", "en", "English", "+64 9"),
)
FACILITY_KINDS: Final = (
    "General Hospital", "Medical Center", "Community Clinic", "University Hospital", "Health Centre",
)  # fmt: skip
STREETS: Final = (
    "Main Street", "Oak Avenue", "Station Road", "Church Lane", "Harbour View", "Elm Street", "Park Avenue",
    "Mill Road", "High Street", "Maple Drive", "Cedar Court", "River Road", "Chestnut Way", "Kings Road",
)  # fmt: skip
FAMILY_NAMES: Final = (
    "Smith", "García", "Müller", "Nguyen", "Kowalski", "O'Brien", "Rossi", "Silva", "Kim", "Patel", "Okafor",
    "Johansson", "Dubois", "Novák", "Y\u0131lmaz", "Haddad", "Tanaka", "Fernández", "Schmidt", "Murphy", "Costa",
    "Papadopoulos", "Virtanen", "Andersen", "Cohen", "Mensah", "Chen", "Singh", "Ali", "Santos", "Hernández",
    "Lefebvre", "Bianchi", "Wójcik", "Jansen", "Horváth", "Moreau", "Ahmed", "Wang", "Van der Berg", "MacLeod",
    "Nakamura", "Adeyemi", "Kuznetsov", "Lindqvist", "Ó Súilleabháin", "Da Costa-Pereira", "Brown", "Lee",
)  # fmt: skip
GIVEN_MALE: Final = (
    "James", "Mateo", "Lukas", "Minh", "Piotr", "Liam", "Marco", "João", "Ji-ho", "Arjun", "Chinedu", "Erik",
    "Louis", "Tomáš", "Emre", "Omar", "Hiroshi", "Diego", "Finn", "Nikos", "Mikko", "David", "Kwame", "Wei",
    "Ravi", "Yusuf", "Noah", "Elias", "Ahmad", "Santiago", "Oisín", "William",
)  # fmt: skip
GIVEN_FEMALE: Final = (
    "Mary", "Sofía", "Emma", "Linh", "Zofia", "Aoife", "Giulia", "Ana", "Seo-yeon", "Priya", "Ngozi", "Astrid",
    "Chloé", "Eva", "Elif", "Layla", "Yuki", "Lucía", "Hannah", "Eleni", "Aino", "Sarah", "Ama", "Mei",
    "Ananya", "Fatima", "Olivia", "Maja", "Amira", "Isabella", "Zoë", "Charlotte",
)  # fmt: skip


class Code(NamedTuple):
    code: str
    display: str
    unit: str = ""  # UCUM code (also used as the human-readable unit)


# Vital signs (LOINC) -- unit is the UCUM code.
HEART_RATE: Final = Code("8867-4", "Heart rate", "/min")
RESP_RATE: Final = Code("9279-1", "Respiratory rate", "/min")
BODY_TEMP: Final = Code("8310-5", "Body temperature", "Cel")
BODY_WEIGHT: Final = Code("29463-7", "Body weight", "kg")
BODY_HEIGHT: Final = Code("8302-2", "Body height", "cm")
BMI: Final = Code("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2")
O2_SAT: Final = Code("2708-6", "Oxygen saturation in Arterial blood", "%")
BP_PANEL: Final = Code("85354-9", "Blood pressure panel with all children optional")
BP_SYSTOLIC: Final = Code("8480-6", "Systolic blood pressure", "mm[Hg]")
BP_DIASTOLIC: Final = Code("8462-4", "Diastolic blood pressure", "mm[Hg]")


class Lab(NamedTuple):
    code: str
    display: str
    unit: str
    decimals: int
    ref_male: tuple[float | None, float | None]
    ref_female: tuple[float | None, float | None]
    mean_male: float
    mean_female: float
    sd: float
    condition: str | None = None  # SNOMED code that shifts the distribution
    cond_mean: float = 0.0
    cond_sd: float = 0.0


LABS: Final = {
    lab.code: lab
    for lab in (
        Lab("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 1, (4.0, 5.6), (4.0, 5.6), 5.3, 5.3, 0.3,
            "44054006", 7.6, 1.1),
        Lab("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 0, (70, 99), (70, 99), 91, 89, 10,
            "44054006", 156, 38),
        Lab("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 2, (0.74, 1.35), (0.59, 1.04),
            0.98, 0.79, 0.14, "433144002", 1.9, 0.4),
        Lab("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 0, (135, 145), (135, 145), 140, 140, 2.3),
        Lab("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1, (3.5, 5.1), (3.5, 5.1), 4.2, 4.2,
            0.35, "433144002", 4.9, 0.4),
        Lab("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 1, (13.5, 17.5), (12.0, 15.5), 15.1, 13.6, 1.0,
            "271737000", 10.4, 0.9),
        Lab("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 0, (None, 200), (None, 200), 182, 186,
            28, "55822004", 242, 32),
        Lab("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 0, (40, None), (50, None),
            50, 60, 11),
        Lab("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "mg/dL", 0,
            (None, 130), (None, 130), 108, 106, 25, "55822004", 165, 30),
        Lab("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 0, (None, 150), (None, 150), 128,
            118, 40, "55822004", 215, 60),
    )
}  # fmt: skip
PANELS: Final = {
    "bmp": ("2345-7", "2160-0", "2951-2", "2823-3"),
    "lipid": ("2093-3", "2085-9", "13457-7", "2571-8"),
    "cbc": ("718-7",),
    "a1c": ("4548-4", "2345-7"),
}


class Med(NamedTuple):
    code: str  # RxNorm
    display: str
    text: str
    frequency: int
    period: float
    period_unit: str
    as_needed: bool = False
    days: int = 0  # course length for acute therapy (0 = continuous)
    penicillin: bool = False


MEDS: Final = {
    "metformin": Med("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
                     "Take 1 tablet by mouth once daily with the evening meal", 1, 1, "d"),
    "lisinopril": Med("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, 1, "d"),
    "amlodipine": Med("308136", "amlodipine 2.5 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, 1, "d"),
    "hctz": Med("310798", "hydrochlorothiazide 25 MG Oral Tablet", "Take 1 tablet by mouth every morning", 1, 1, "d"),
    "atorvastatin": Med("617312", "atorvastatin 10 MG Oral Tablet", "Take 1 tablet by mouth at bedtime", 1, 1, "d"),
    "simvastatin": Med("312961", "simvastatin 20 MG Oral Tablet", "Take 1 tablet by mouth in the evening", 1, 1, "d"),
    "albuterol": Med("745679", "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
                     "Inhale 2 puffs every 4 to 6 hours as needed for shortness of breath", 1, 4, "h", True),
    "fluticasone": Med("895996", "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler [Flovent]",
                       "Inhale 2 puffs twice daily; rinse mouth after use", 2, 1, "d"),
    "warfarin": Med("855332", "warfarin sodium 5 MG Oral Tablet",
                    "Take 1 tablet by mouth once daily in the evening; dose adjusted to INR", 1, 1, "d"),
    "sertraline": Med("312938", "sertraline 100 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, 1, "d"),
    "levothyroxine": Med("966222", "levothyroxine sodium 0.075 MG Oral Tablet",
                         "Take 1 tablet by mouth every morning on an empty stomach", 1, 1, "d"),
    "clopidogrel": Med("309362", "clopidogrel 75 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, 1, "d"),
    "ferrous": Med("310325", "ferrous sulfate 325 MG Oral Tablet", "Take 1 tablet by mouth once daily", 1, 1, "d"),
    "acetaminophen": Med("313782", "acetaminophen 325 MG Oral Tablet",
                         "Take 2 tablets by mouth every 6 hours as needed for pain or fever", 1, 6, "h", True, 7),
    "amoxicillin": Med("308182", "amoxicillin 250 MG Oral Capsule",
                       "Take 2 capsules by mouth three times daily for 7 days", 3, 1, "d", False, 7, True),
    "nitrofurantoin": Med("1648755",
                          "nitrofurantoin, macrocrystals 25 MG / nitrofurantoin, monohydrate 75 MG Oral Capsule",
                          "Take 1 capsule by mouth twice daily for 5 days", 2, 1, "d", False, 5),
}  # fmt: skip


class Chronic(NamedTuple):
    code: str  # SNOMED CT
    display: str
    min_age: int
    prevalence: float  # for age >= min_age (doubled from 65)
    meds: tuple[str, ...]  # options; the first one or two are prescribed


CHRONIC: Final = (
    Chronic("44054006", "Diabetes mellitus type 2", 35, 0.10, ("metformin",)),
    Chronic("38341003", "Hypertensive disorder, systemic arterial", 30, 0.20, ("lisinopril", "amlodipine", "hctz")),
    Chronic("55822004", "Hyperlipidemia", 35, 0.14, ("atorvastatin", "simvastatin")),
    Chronic("195967001", "Asthma", 3, 0.08, ("albuterol", "fluticasone")),
    Chronic("13645005", "Chronic obstructive lung disease", 45, 0.04, ("albuterol",)),
    Chronic("49436004", "Atrial fibrillation", 55, 0.04, ("warfarin",)),
    Chronic("35489007", "Depressive disorder", 14, 0.07, ("sertraline",)),
    Chronic("40930008", "Hypothyroidism", 20, 0.04, ("levothyroxine",)),
    Chronic("433144002", "Chronic kidney disease stage 3", 50, 0.04, ()),
    Chronic("396275006", "Osteoarthritis", 50, 0.10, ("acetaminophen",)),
    Chronic("53741008", "Coronary arteriosclerosis", 50, 0.04, ("clopidogrel", "atorvastatin")),
    Chronic("271737000", "Anemia", 0, 0.03, ("ferrous",)),
)
OBESITY: Final = Chronic("162864005", "Body mass index 30+ - obesity", 18, 0.0, ())


class Acute(NamedTuple):
    code: str  # SNOMED CT
    display: str
    classes: str  # encounter classes it presents in
    min_age: int
    max_age: int
    fever: bool
    respiratory: bool
    med: str | None


ACUTE: Final = (
    Acute("195662009", "Acute viral pharyngitis", "AMB", 0, 120, True, False, "acetaminophen"),
    Acute("444814009", "Viral sinusitis", "AMB", 0, 120, False, False, None),
    Acute("10509002", "Acute bronchitis", "AMB EMER", 0, 120, True, True, "acetaminophen"),
    Acute("43878008", "Streptococcal sore throat", "AMB", 3, 60, True, False, "amoxicillin"),
    Acute("65363002", "Otitis media", "AMB", 0, 12, True, False, "amoxicillin"),
    Acute("307426000", "Acute infective cystitis", "AMB EMER", 12, 120, False, False, "nitrofurantoin"),
    Acute("233604007", "Pneumonia", "EMER IMP", 0, 120, True, True, "amoxicillin"),
    Acute("44465007", "Sprain of ankle", "AMB EMER", 5, 120, False, False, "acetaminophen"),
    Acute("125605004", "Fracture of bone", "EMER IMP", 0, 120, False, False, "acetaminophen"),
)

ENCOUNTER_CLASSES: Final = {"AMB": "ambulatory", "EMER": "emergency", "IMP": "inpatient encounter"}
ENCOUNTER_TYPES: Final = {
    "check-up": Code("185349003", "Encounter for check up"),
    "symptom": Code("185345009", "Encounter for symptom"),
    "EMER": Code("50849002", "Emergency room admission"),
    "IMP": Code("32485007", "Hospital admission"),
}
ENCOUNTER_COUNT_WEIGHTS: Final = (25, 22, 18, 15, 12, 8)  # 1..6 encounters per patient

MANIFESTATIONS: Final = {
    "urticaria": Code("126485001", "Urticaria"),
    "rash": Code("271807003", "Eruption of skin"),
    "anaphylaxis": Code("39579001", "Anaphylaxis"),
    "dyspnea": Code("267036007", "Dyspnea"),
    "wheezing": Code("56018004", "Wheezing"),
    "itching": Code("418290006", "Itching of skin"),
    "nausea": Code("422587007", "Nausea"),
    "sneezing": Code("76067001", "Sneezing"),
    "cough": Code("49727002", "Cough"),
}


class Allergen(NamedTuple):
    code: str  # SNOMED CT substance
    display: str
    category: str
    reactions: tuple[str, ...]
    weight: int


ALLERGENS: Final = (
    Allergen("764146007", "Penicillin", "medication", ("urticaria", "rash", "anaphylaxis"), 25),
    Allergen("762952008", "Peanut", "food", ("urticaria", "anaphylaxis", "nausea"), 12),
    Allergen("111088007", "Latex", "environment", ("itching", "urticaria", "rash"), 6),
    Allergen("387207008", "Ibuprofen", "medication", ("urticaria", "dyspnea", "wheezing"), 6),
    Allergen("387458008", "Aspirin", "medication", ("wheezing", "urticaria", "dyspnea"), 5),
    Allergen("256259004", "Pollen", "environment", ("sneezing", "itching", "cough"), 16),
    Allergen("260147004", "House dust mite", "environment", ("sneezing", "cough", "wheezing"), 12),
    Allergen("102263004", "Eggs", "food", ("urticaria", "nausea", "rash"), 8),
    Allergen("288328004", "Bee venom", "environment", ("urticaria", "anaphylaxis"), 5),
)
ALLERGEN_CUM: Final = tuple(accumulate(a.weight for a in ALLERGENS))
PENICILLIN: Final = "764146007"

# --------------------------------------------------------------------------- small builders


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _coded(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def _ref(kind: str, rid: str) -> dict[str, str]:
    return {"reference": f"{kind}/{rid}"}


def _meta(facility: str) -> dict[str, Any]:
    return {"tag": [{"system": FACILITY_TAG_SYSTEM, "code": facility}]}


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _dt(moment: datetime, tz: str) -> str:
    return moment.isoformat() + tz  # moments never carry seconds/microseconds


def _ascii(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in plain.lower() if ch.isalnum())


def _luhn(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def _clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def mrn_system(facility: str) -> str:
    """Identifier system of the medical record numbers issued by ``facility``."""
    return MRN_SYSTEM_PREFIX + facility


def facility_ids(count: int) -> list[str]:
    """Deterministic facility ids: ``["fac-001", "fac-002", ...]``."""
    if count < 0:
        raise ValueError("count must be >= 0")
    return [f"fac-{i:03d}" for i in range(1, count + 1)]


# --------------------------------------------------------------------------- generator state


@dataclass(slots=True)
class _Facility:
    fid: str
    org_id: str
    name: str
    city: City
    practitioners: list[str]
    next_mrn: int


@dataclass(slots=True)
class _Person:
    pid: str
    fac: _Facility
    gender: str
    female: bool
    birth: date
    height: float  # adult height (cm)
    bmi: float  # adult baseline BMI
    gp: str
    codes: frozenset[str]  # chronic condition codes (membership only, never iterated)


@dataclass(slots=True)
class _Encounter:
    eid: str
    cls: str
    start: datetime
    end: datetime
    practitioner: str
    acute: Acute | None


class _Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        mul = rng.randrange(1, 10**9)
        while math.gcd(mul, 10) != 1:
            mul += 1
        self.nid_mul, self.nid_add = mul, rng.randrange(10**9)

    def uid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def phone(self, city: City) -> str:
        return f"{city.phone} {self.rng.randrange(200, 1000)} {self.rng.randrange(10000):04d}"

    # ----------------------------------------------------------------- facilities & staff

    def facility(self, fid: str) -> tuple[_Facility, list[Resource]]:
        rng = self.rng
        city = rng.choice(CITIES)
        name = f"{city.name} {rng.choice(FACILITY_KINDS)}"
        fac = _Facility(fid, self.uid(), name, city, [], rng.randrange(100_000, 900_000))
        org: Resource = {
            "resourceType": "Organization",
            "id": fac.org_id,
            "meta": _meta(fid),
            "identifier": [{"system": FACILITY_ID_SYSTEM, "value": fid}],
            "active": True,
            "type": [_coded(ORG_TYPE, "prov", "Healthcare Provider")],
            "name": name,
            "contact": [{
                "telecom": [
                    {"system": "phone", "value": self.phone(city), "use": "work"},
                    {"system": "email", "value": f"contact@{_ascii(name)}.example.org", "use": "work"},
                ],
                "address": {"use": "work", "line": [f"{rng.randrange(1, 200)} {rng.choice(STREETS)}"],
                            "city": city.name, "state": city.state, "postalCode": city.postal,
                            "country": city.country},
            }],
        }  # fmt: skip
        staff = [org]
        for n in range(3 + rng.randrange(4)):
            female = rng.random() < 0.5
            given, family = rng.choice(GIVEN_FEMALE if female else GIVEN_MALE), rng.choice(FAMILY_NAMES)
            prid = self.uid()
            fac.practitioners.append(prid)
            staff.append({
                "resourceType": "Practitioner",
                "id": prid,
                "meta": _meta(fid),
                "identifier": [{"system": STAFF_ID_SYSTEM, "value": f"{fid}-{n + 1:03d}"}],
                "active": True,
                "name": [{"use": "official", "family": family, "given": [given], "prefix": ["Dr."]}],
                "telecom": [
                    {"system": "phone", "value": self.phone(city), "use": "work"},
                    {"system": "email", "value": f"{_ascii(given)}.{_ascii(family)}@{fid}.example.org", "use": "work"},
                ],
                "gender": "female" if female else "male",
            })  # fmt: skip
        return fac, staff

    # ----------------------------------------------------------------- patient

    def patient(self, index: int, fac: _Facility) -> list[Resource]:
        rng = self.rng
        pid = self.uid()
        roll = rng.random()
        gender = "male" if roll < 0.49 else "female" if roll < 0.98 else "other" if roll < 0.99 else "unknown"
        female = gender == "female" or (gender != "male" and rng.random() < 0.5)
        age = int(rng.betavariate(1.6, 2.0) * 92)
        birth = ANCHOR.date() - timedelta(days=age * 365 + rng.randrange(30, 395))
        height = rng.gauss(163.0 if female else 176.5, 7.0)
        bmi = _clamp(rng.gauss(26.5, 4.8), 16.5, 48.0)
        codes = [c for c in CHRONIC if age >= c.min_age and rng.random() < c.prevalence * (2 if age >= 65 else 1)]
        if age >= 18 and bmi >= 30 and rng.random() < 0.7:
            codes.append(OBESITY)
        allergens: list[Allergen] = []
        if rng.random() < 0.3:
            for _ in range(rng.choices((1, 2, 3), cum_weights=(70, 95, 100))[0]):
                allergen = rng.choices(ALLERGENS, cum_weights=ALLERGEN_CUM)[0]
                if allergen not in allergens:
                    allergens.append(allergen)
        person = _Person(pid, fac, gender, female, birth, height, bmi, rng.choice(fac.practitioners),
                         frozenset(c.code for c in codes))  # fmt: skip
        out = [self.patient_resource(index, person, age)]
        encounters = self.encounters(person)
        for n, enc in enumerate(encounters):
            out.append(self.encounter_resource(person, enc))
            out.extend(self.vitals(person, enc, first=n == 0))
            out.extend(self.labs(person, enc))
        out.extend(
            self.conditions_and_meds(person, encounters, codes, penicillin=any(a.code == PENICILLIN for a in allergens))
        )
        out.extend(self.allergy(person, a, encounters[0]) for a in allergens)
        return out

    def patient_resource(self, index: int, p: _Person, age: int) -> Resource:
        rng, fac, city = self.rng, p.fac, p.fac.city
        given = [rng.choice(GIVEN_FEMALE if p.female else GIVEN_MALE)]
        if rng.random() < 0.3:
            given.append(rng.choice(GIVEN_FEMALE if p.female else GIVEN_MALE))
        family = rng.choice(FAMILY_NAMES)
        nid = f"{(self.nid_mul * index + self.nid_add) % 10**9:09d}"
        mrn = f"MRN{fac.next_mrn:07d}"
        fac.next_mrn += 1
        telecom = [{"system": "phone", "value": self.phone(city), "use": "mobile"}]
        if age >= 16:
            email = f"{_ascii(given[0])}.{_ascii(family)}{rng.randrange(1, 100)}@example.com"
            telecom.append({"system": "email", "value": email, "use": "home"})
        res: Resource = {
            "resourceType": "Patient",
            "id": p.pid,
            "meta": _meta(fac.fid),
            "identifier": [
                {"use": "official", "type": _coded(IDENTIFIER_TYPE, "NI", "National unique individual identifier"),
                 "system": NATIONAL_ID_SYSTEM, "value": nid + _luhn(nid)},
                {"use": "usual", "type": _coded(IDENTIFIER_TYPE, "MR", "Medical record number"),
                 "system": mrn_system(fac.fid), "value": mrn,
                 "assigner": {"reference": f"Organization/{fac.org_id}", "display": fac.name}},
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": given}],
            "telecom": telecom,
            "gender": p.gender,
            "birthDate": p.birth.isoformat(),
            "address": [{"use": "home", "type": "physical",
                         "line": [f"{rng.randrange(1, 400)} {rng.choice(STREETS)}"], "city": city.name,
                         "state": city.state, "postalCode": city.postal, "country": city.country}],
        }  # fmt: skip
        if age >= 18:
            status = rng.choices(("S", "M", "D", "W"), cum_weights=(30, 80, 92, 100) if age < 65 else (8, 68, 80, 100))
            display = {"S": "Never Married", "M": "Married", "D": "Divorced", "W": "Widowed"}[status[0]]
            res["maritalStatus"] = _coded(MARITAL_STATUS, status[0], display)
        res["communication"] = [{"language": _coded(BCP47, city.lang, city.lang_display), "preferred": True}]
        res["generalPractitioner"] = [_ref("Practitioner", p.gp)]
        res["managingOrganization"] = _ref("Organization", fac.org_id)
        return res

    # ----------------------------------------------------------------- encounters

    def encounters(self, p: _Person) -> list[_Encounter]:
        rng = self.rng
        earliest = max(ANCHOR - HISTORY, datetime.combine(p.birth, datetime.min.time()) + timedelta(days=1))
        span = (ANCHOR - timedelta(days=8) - earliest).days  # inpatient stays end before ANCHOR
        count = rng.choices(range(1, 7), cum_weights=tuple(accumulate(ENCOUNTER_COUNT_WEIGHTS)))[0]
        days = sorted(rng.randrange(max(span, 1)) for _ in range(count))
        result = []
        for day in days:
            base = earliest + timedelta(days=day)
            roll = rng.random()
            if roll < 0.75:
                cls, start = "AMB", base + timedelta(minutes=480 + 5 * rng.randrange(106))
                end = start + timedelta(minutes=5 * rng.randrange(3, 13))
            elif roll < 0.9:
                cls, start = "EMER", base + timedelta(minutes=rng.randrange(1440))
                end = start + timedelta(minutes=rng.randrange(90, 480))
            else:
                cls, start = "IMP", base + timedelta(minutes=rng.randrange(1440))
                end = start + timedelta(days=rng.randrange(1, 7), minutes=rng.randrange(1440))
            age = (start.date() - p.birth).days / 365.25
            acute = None
            if rng.random() < {"AMB": 0.35, "EMER": 0.85, "IMP": 0.8}[cls]:
                options = [a for a in ACUTE if cls in a.classes and a.min_age <= age <= a.max_age]
                acute = rng.choice(options) if options else None
            prac = p.gp if rng.random() < 0.6 else rng.choice(p.fac.practitioners)
            result.append(_Encounter(self.uid(), cls, start, end, prac, acute))
        return result

    def encounter_resource(self, p: _Person, e: _Encounter) -> Resource:
        tz = p.fac.city.tz
        kind = ENCOUNTER_TYPES[e.cls if e.cls != "AMB" else "symptom" if e.acute else "check-up"]
        res: Resource = {
            "resourceType": "Encounter",
            "id": e.eid,
            "meta": _meta(p.fac.fid),
            "status": "completed",  # R5 value set (R4's "finished")
            "class": [_coded(ACT_CODE, e.cls, ENCOUNTER_CLASSES[e.cls])],
            "type": [_concept(SNOMED, kind.code, kind.display)],
            "subject": _ref("Patient", p.pid),
            "participant": [{"type": [_coded(PARTICIPATION_TYPE, "ATND", "attender")],
                             "actor": _ref("Practitioner", e.practitioner)}],
            "actualPeriod": {"start": _dt(e.start, tz), "end": _dt(e.end, tz)},
            "serviceProvider": _ref("Organization", p.fac.org_id),
        }  # fmt: skip
        if e.cls == "EMER":
            res["priority"] = _coded(ACT_PRIORITY, "EM", "emergency")
        if e.acute:
            res["reason"] = [{"value": [{"concept": _concept(SNOMED, e.acute.code, e.acute.display)}]}]
        return res

    # ----------------------------------------------------------------- observations

    def observation(self, p: _Person, e: _Encounter, category: str, code: Code, when: str) -> Resource:
        return {
            "resourceType": "Observation",
            "id": self.uid(),
            "meta": _meta(p.fac.fid),
            "status": "final",
            "category": [_coded(OBS_CATEGORY, category, "Vital Signs" if category == "vital-signs" else "Laboratory")],
            "code": _concept(LOINC, code.code, code.display),
            "subject": _ref("Patient", p.pid),
            "encounter": _ref("Encounter", e.eid),
            "effectiveDateTime": when,
        }

    def vital(self, p: _Person, e: _Encounter, when: str, code: Code, value: float) -> Resource:
        res = self.observation(p, e, "vital-signs", code, when)
        res["performer"] = [_ref("Practitioner", e.practitioner)]
        res["valueQuantity"] = _qty(value, code.unit)
        return res

    def vitals(self, p: _Person, e: _Encounter, first: bool) -> list[Resource]:
        rng = self.rng
        age = (e.start.date() - p.birth).days / 365.25
        child = age < 18
        when = _dt(e.start + timedelta(minutes=rng.randrange(3, 15)), p.fac.city.tz)
        fever = e.acute is not None and e.acute.fever and rng.random() < 0.7
        resp = e.acute is not None and e.acute.respiratory
        if child:
            hr = rng.gauss(max(78.0, 135 - 4 * age), 10)
            rr = rng.gauss(max(16.0, 38 - 1.3 * age), 3)
            height = 50 + 18.5 * age if age < 2 else 87 + (p.height - 87) * min(1.0, (age - 2) / 16)
            bmi = 16.0 + max(0.0, p.bmi - 16.0) * max(0.0, age - 6) / 12
        else:
            hr, rr, height, bmi = rng.gauss(74, 9), rng.gauss(15, 2), p.height, p.bmi + rng.gauss(0, 0.5)
        weight = 3.4 + 4.5 * age if age < 2 else bmi * (height / 100) ** 2
        hr += (12 if fever else 0) + (8 if e.cls == "EMER" else 0)
        rr += 6 if resp else 0
        temp = rng.gauss(38.4, 0.5) if fever else rng.gauss(36.8, 0.25)
        o2 = rng.gauss(97.6, 1.0) - (5 if resp else 0) - (3 if "13645005" in p.codes else 0)
        if child:
            systolic, diastolic = rng.gauss(96 + 1.2 * age, 8), rng.gauss(60 + 0.8 * age, 6)
        elif "38341003" in p.codes:
            systolic, diastolic = rng.gauss(142, 13), rng.gauss(88, 8)
        else:
            systolic, diastolic = rng.gauss(116 + 0.3 * max(0.0, age - 35), 10), rng.gauss(75, 7)
        weight = round(_clamp(weight * (1 + rng.gauss(0, 0.01)), 2.0, 250.0), 1)
        out = [
            self.vital(p, e, when, HEART_RATE, round(_clamp(hr, 40, 200))),
            self.vital(p, e, when, RESP_RATE, round(_clamp(rr, 8, 60))),
            self.vital(p, e, when, BODY_TEMP, round(_clamp(temp, 35.0, 41.5), 1)),
            self.vital(p, e, when, O2_SAT, round(_clamp(o2, 80, 100))),
            self.vital(p, e, when, BODY_WEIGHT, weight),
        ]
        if child or first or rng.random() < 0.25:
            out.append(self.vital(p, e, when, BODY_HEIGHT, round(height, 1)))
            if age >= 2:
                out.append(self.vital(p, e, when, BMI, round(weight / (height / 100) ** 2, 1)))
        systolic = round(_clamp(systolic, 70, 230))
        diastolic = round(_clamp(diastolic, 35, systolic - 20))
        bp = self.observation(p, e, "vital-signs", BP_PANEL, when)
        bp["performer"] = [_ref("Practitioner", e.practitioner)]
        bp["component"] = [
            {"code": _concept(LOINC, BP_SYSTOLIC.code, BP_SYSTOLIC.display), "valueQuantity": _qty(systolic, "mm[Hg]")},
            {"code": _concept(LOINC, BP_DIASTOLIC.code, BP_DIASTOLIC.display),
             "valueQuantity": _qty(diastolic, "mm[Hg]")},
        ]  # fmt: skip
        out.append(bp)
        return out

    def labs(self, p: _Person, e: _Encounter) -> list[Resource]:
        rng = self.rng
        age = (e.start.date() - p.birth).days / 365.25
        panels: list[str] = []
        if e.cls == "IMP":
            panels = ["bmp", "cbc"]
        elif e.cls == "EMER":
            if rng.random() < 0.7:
                panels = ["bmp", "cbc"] if rng.random() < 0.5 else ["bmp"]
        elif rng.random() < (0.6 if p.codes else 0.3):
            if "44054006" in p.codes and rng.random() < 0.6:
                panels = ["a1c"]
            elif age < 18:
                panels = ["cbc"]
            else:
                panels = [rng.choice(("bmp", "lipid", "cbc", "lipid" if "55822004" in p.codes else "bmp"))]
        if not panels:
            return []
        minutes = int((e.end - e.start).total_seconds() // 60)
        taken = e.start + timedelta(minutes=rng.randrange(5, max(6, min(minutes, 90))))
        tz = p.fac.city.tz
        when, issued = _dt(taken, tz), _dt(taken + timedelta(minutes=rng.randrange(30, 300)), tz)
        codes = [c for panel in panels for c in PANELS[panel]]
        return [self.lab(p, e, LABS[c], when, issued) for i, c in enumerate(codes) if c not in codes[:i]]

    def lab(self, p: _Person, e: _Encounter, lab: Lab, when: str, issued: str) -> Resource:
        rng = self.rng
        if lab.condition is not None and lab.condition in p.codes:
            raw = rng.gauss(lab.cond_mean, lab.cond_sd)
        else:
            raw = rng.gauss(lab.mean_female if p.female else lab.mean_male, lab.sd)
        raw = max(raw, lab.mean_male * 0.3)
        value: float = round(raw) if lab.decimals == 0 else round(raw, lab.decimals)
        low, high = lab.ref_female if p.female else lab.ref_male
        res = self.observation(p, e, "laboratory", Code(lab.code, lab.display), when)
        res["issued"] = issued
        res["performer"] = [_ref("Organization", p.fac.org_id)]
        res["valueQuantity"] = _qty(value, lab.unit)
        flag = "H" if high is not None and value > high else "L" if low is not None and value < low else "N"
        if flag != "N" or rng.random() < 0.5:
            display = {"H": "High", "L": "Low", "N": "Normal"}[flag]
            res["interpretation"] = [_coded(OBS_INTERPRETATION, flag, display)]
        ref_range: dict[str, Any] = {}
        if low is not None:
            ref_range["low"] = _qty(round(low) if lab.decimals == 0 else low, lab.unit)
        if high is not None:
            ref_range["high"] = _qty(round(high) if lab.decimals == 0 else high, lab.unit)
        res["referenceRange"] = [ref_range]
        return res

    # ----------------------------------------------------------------- conditions, meds, allergies

    def condition(self, p: _Person, e: _Encounter, spec: Chronic | Acute, chronic: bool) -> tuple[str, Resource]:
        rng, tz = self.rng, p.fac.city.tz
        cid = self.uid()
        res: Resource = {
            "resourceType": "Condition",
            "id": cid,
            "meta": _meta(p.fac.fid),
            "clinicalStatus": _coded(CONDITION_CLINICAL, "active", "Active"),
            "verificationStatus": _coded(CONDITION_VERIFICATION, "confirmed", "Confirmed"),
            "category": [_coded(CONDITION_CATEGORY, "problem-list-item", "Problem List Item") if chronic
                         else _coded(CONDITION_CATEGORY, "encounter-diagnosis", "Encounter Diagnosis")],
            "code": _concept(SNOMED, spec.code, spec.display),
            "subject": _ref("Patient", p.pid),
            "encounter": _ref("Encounter", e.eid),
        }  # fmt: skip
        if chronic:
            first = p.birth + timedelta(days=int(spec.min_age * 365.25) + 1)
            onset = max(first, e.start.date() - timedelta(days=rng.randrange(0, 3 * 365)))
            res["onsetDateTime"] = min(onset, e.start.date()).isoformat()
        else:
            res["onsetDateTime"] = (e.start.date() - timedelta(days=rng.randrange(0, 6))).isoformat()
            abatement = e.end.date() + timedelta(days=rng.randrange(5, 22))
            if abatement < ANCHOR.date():
                res["clinicalStatus"] = _coded(CONDITION_CLINICAL, "resolved", "Resolved")
                res["abatementDateTime"] = abatement.isoformat()
        res["recordedDate"] = _dt(e.start, tz)
        return cid, res

    def conditions_and_meds(
        self, p: _Person, encounters: Sequence[_Encounter], chronic: Sequence[Chronic], penicillin: bool
    ) -> list[Resource]:
        rng = self.rng
        conditions: list[Resource] = []
        orders: list[tuple[str, _Encounter, str, bool]] = []  # (med key, encounter, condition id, chronic)
        prescribed: list[str] = []
        for spec in chronic:
            enc = encounters[0] if rng.random() < 0.6 else rng.choice(encounters)
            cid, res = self.condition(p, enc, spec, chronic=True)
            conditions.append(res)
            picks = spec.meds[: 2 if len(spec.meds) > 1 and rng.random() < 0.3 else 1]
            for key in picks:
                if key not in prescribed and rng.random() < 0.9:
                    prescribed.append(key)
                    orders.append((key, enc, cid, True))
        for enc in encounters:
            if enc.acute is None:
                continue
            cid, res = self.condition(p, enc, enc.acute, chronic=False)
            conditions.append(res)
            acute_med = enc.acute.med
            if acute_med is not None and not (penicillin and MEDS[acute_med].penicillin) and rng.random() < 0.85:
                orders.append((acute_med, enc, cid, False))
        meds = [self.medication_request(p, *order) for order in orders]
        return conditions + meds

    def medication_request(self, p: _Person, key: str, e: _Encounter, cid: str, chronic: bool) -> Resource:
        med = MEDS[key]
        if chronic:
            status = "active" if self.rng.random() < 0.9 else "completed"
            course = _coded(COURSE_OF_THERAPY, "continuous", "Continuous long term therapy")
        else:
            finished = e.end + timedelta(days=med.days or 7) < ANCHOR
            status = "completed" if finished else "active"
            course = _coded(COURSE_OF_THERAPY, "acute", "Short course (acute) therapy")
        repeat: dict[str, Any] = {"frequency": med.frequency, "period": med.period, "periodUnit": med.period_unit}
        if med.days and not chronic:
            repeat["boundsDuration"] = {"value": med.days, "unit": "days", "system": UCUM, "code": "d"}
        dosage: dict[str, Any] = {"sequence": 1, "text": med.text, "timing": {"repeat": repeat}}
        if med.as_needed:
            dosage["asNeeded"] = True
        return {
            "resourceType": "MedicationRequest",
            "id": self.uid(),
            "meta": _meta(p.fac.fid),
            "status": status,
            "intent": "order",
            "medication": {"concept": _concept(RXNORM, med.code, med.display)},
            "subject": _ref("Patient", p.pid),
            "encounter": _ref("Encounter", e.eid),
            "authoredOn": _dt(e.end - timedelta(minutes=5), p.fac.city.tz),
            "requester": _ref("Practitioner", e.practitioner),
            "reason": [{"reference": _ref("Condition", cid)}],
            "courseOfTherapyType": course,
            "dosageInstruction": [dosage],
        }

    def allergy(self, p: _Person, allergen: Allergen, e: _Encounter) -> Resource:
        rng = self.rng
        reaction = MANIFESTATIONS[rng.choice(allergen.reactions)]
        severe = reaction.code == MANIFESTATIONS["anaphylaxis"].code
        onset_age_days = rng.randrange(180, max(181, (e.start.date() - p.birth).days))
        intolerance = allergen.category == "medication" and not severe and rng.random() < 0.3
        return {
            "resourceType": "AllergyIntolerance",
            "id": self.uid(),
            "meta": _meta(p.fac.fid),
            "clinicalStatus": _coded(ALLERGY_CLINICAL, "active", "Active"),
            "verificationStatus": _coded(ALLERGY_VERIFICATION, "confirmed", "Confirmed"),
            "type": _coded(ALLERGY_TYPE, "intolerance", "Intolerance") if intolerance
            else _coded(ALLERGY_TYPE, "allergy", "Allergy"),
            "category": [allergen.category],
            "criticality": "high" if severe else rng.choice(("low", "low", "high", "unable-to-assess")),
            "code": _concept(SNOMED, allergen.code, allergen.display),
            "patient": _ref("Patient", p.pid),
            "onsetDateTime": min(p.birth + timedelta(days=onset_age_days), e.start.date()).isoformat(),
            "recordedDate": _dt(e.start, p.fac.city.tz),
            "reaction": [{
                "manifestation": [{"concept": _concept(SNOMED, reaction.code, reaction.display)}],
                "severity": "severe" if severe else rng.choice(("mild", "mild", "moderate")),
            }],
        }  # fmt: skip


# --------------------------------------------------------------------------- public API


def _validated(patients: int, facilities: int) -> None:
    if patients < 0:
        raise ValueError("patients must be >= 0")
    if facilities < 1:
        raise ValueError("facilities must be >= 1")


def _stream(patients: int, facilities: int, seed: int) -> Iterator[Resource]:
    gen = _Generator(seed)
    built = [gen.facility(fid) for fid in facility_ids(facilities)]
    for _, staff in built:
        yield staff[0]  # all Organizations first
    for _, staff in built:
        yield from staff[1:]
    facs = [fac for fac, _ in built]
    del built
    for index in range(patients):
        yield from gen.patient(index, facs[index % facilities])


def generate(patients: int, facilities: int, seed: int) -> Iterator[dict[str, Any]]:
    """Lazily yield the synthetic resources (see module docstring for the contract)."""
    _validated(patients, facilities)
    return _stream(patients, facilities, seed)


def write_ndjson(
    path: str | Path,
    patients: int,
    facilities: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``generate(...)`` to ``path`` as NDJSON; return the number of resources written."""
    resources = generate(patients, facilities, seed)
    dumps, option = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    count = reported = 0
    chunk: list[bytes] = []
    with Path(path).open("wb") as fh:
        for resource in resources:
            chunk.append(dumps(resource, option=option))
            count += 1
            if len(chunk) >= 2048:
                fh.write(b"".join(chunk))
                chunk.clear()
            if progress is not None and count - reported >= PROGRESS_EVERY:
                progress(count - reported)
                reported = count
        fh.write(b"".join(chunk))
    if progress is not None and count > reported:
        progress(count - reported)
    return count
