// Shared helpers of the UniHealth k6 scenarios (see README.md beside this file).
//
// Every scenario reads one JSON file written by `unihealth bench` (path in the environment variable
// UNIHEALTH_BENCH_DATA, passed with `k6 run -e UNIHEALTH_BENCH_DATA=...`):
//   { "version": 1,
//     "base": "http://127.0.0.1:PORT",            // the server under test
//     "fhir": "http://127.0.0.1:PORT/fhir/r5",    // its FHIR REST base
//     "facilities": [{ "id": "fac-001", "token": "<JWT>" }, ...],
//     "patients": [{ "id": "<uuid>", "f": 0, "c": 0.0123 }, ...],  // f: index into facilities,
//                                                                   // c: cumulative Pareto weight
//     "encounters": 5, "page_size": 10,
//     "graphql": "http://127.0.0.1:PORT/graphql",   // the edge's federated graph
//     "queries": { "summary": "query Summary($id: ID!) {...}", "ward": "query Ward {...}" } }
// The GraphQL operations come from gateway/federation/bench.py (SUMMARY, WARD), written here by the
// bench, so this load test and the federation benchmark ask the same questions.
// Tokens are real access tokens minted for the server's own keys (HS256 development key for the
// embedded profile, RS256 against UNIHEALTH_JWKS for production), one clinician per facility.
import http from 'k6/http';
import { SharedArray } from 'k6/data';

const DATA_PATH = __ENV.UNIHEALTH_BENCH_DATA;
if (!DATA_PATH) {
  throw new Error('set UNIHEALTH_BENCH_DATA to the JSON file `unihealth bench` writes (k6 run -e UNIHEALTH_BENCH_DATA=...)');
}

// Opened once per VU in the init context; the patient list is shared between VUs.
const raw = JSON.parse(open(DATA_PATH));
export const config = {
  base: raw.base,
  fhir: raw.fhir,
  encounters: raw.encounters || 5,
  pageSize: raw.page_size || 10,
  graphql: raw.graphql || `${raw.base}/graphql`,
  queries: raw.queries || {},
};
export const facilities = raw.facilities || [];
export const patients = new SharedArray('patients', () => JSON.parse(open(DATA_PATH)).patients || []);

// The latency goal of the seed (P95 < 50 ms under load); override with -e UNIHEALTH_P95_MS=...
export const P95_MS = Number(__ENV.UNIHEALTH_P95_MS || 50);

// Thresholds shared by every scenario: < 1 % failed requests, > 99 % passed checks, P95 under goal.
// `extra` adds per-tag thresholds (e.g. {'http_req_duration{name:summary}': ['p(95)<50']}).
export function thresholds(extra) {
  return Object.assign(
    {
      http_req_failed: ['rate<0.01'],
      checks: ['rate>0.99'],
      http_req_duration: [`p(95)<${P95_MS}`],
    },
    extra || {},
  );
}

export const SUMMARY_TREND_STATS = ['avg', 'min', 'med', 'max', 'p(50)', 'p(95)', 'p(99)'];

function facilityHeaders(facility, extra) {
  return Object.assign(
    {
      Authorization: `Bearer ${facility.token}`,
      'X-Facility-Id': facility.id,
      Accept: 'application/fhir+json',
    },
    extra || {},
  );
}

// A uniformly chosen patient (spread over every facility) with its facility's request headers.
export function uniformPatient() {
  const p = patients[Math.floor(Math.random() * patients.length)];
  return { id: p.id, facility: facilities[p.f] };
}

// A Pareto-chosen patient: each patient's popularity was drawn from a Pareto distribution
// (alpha = log4(5), the 80/20 rule) by the bench; `c` is the cumulative share, so a binary search
// on a uniform draw picks patient i with probability proportional to its popularity: a few are hot.
export function paretoPatient() {
  const u = Math.random();
  let lo = 0;
  let hi = patients.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (patients[mid].c < u) lo = mid + 1;
    else hi = mid;
  }
  const p = patients[lo];
  return { id: p.id, facility: facilities[p.f] };
}

export function readParams(facility, name, keepBody) {
  return {
    headers: facilityHeaders(facility),
    tags: { name },
    responseType: keepBody ? 'text' : 'none',
  };
}

export function writeParams(facility, name) {
  return {
    headers: facilityHeaders(facility, { 'Content-Type': 'application/fhir+json', Prefer: 'return=minimal' }),
    tags: { name },
    responseType: 'none',
  };
}

// RFC 4122 version-4 UUID (for urn:uuid: fullUrls); Math.random is enough for a load test.
export function uuid4() {
  const hex = '0123456789abcdef';
  let out = '';
  for (let i = 0; i < 36; i++) {
    if (i === 8 || i === 13 || i === 18 || i === 23) out += '-';
    else if (i === 14) out += '4';
    else if (i === 19) out += hex[(Math.random() * 4) | 8];
    else out += hex[(Math.random() * 16) | 0];
  }
  return out;
}

const VITALS = [
  ['8867-4', 'Heart rate', '/min', 60, 40],
  ['9279-1', 'Respiratory rate', '/min', 12, 10],
  ['8310-5', 'Body temperature', 'Cel', 36.4, 1.5],
  ['59408-5', 'Oxygen saturation in Arterial blood by Pulse oximetry', '%', 94, 6],
];

// A vital-sign Observation for `subject` (a reference string, e.g. "Patient/<id>" or "urn:uuid:...").
export function vitalSign(subject) {
  const [code, display, unit, base, spread] = VITALS[Math.floor(Math.random() * VITALS.length)];
  return {
    resourceType: 'Observation',
    status: 'final',
    category: [
      {
        coding: [
          { system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs', display: 'Vital Signs' },
        ],
      },
    ],
    code: { coding: [{ system: 'http://loinc.org', code, display }], text: display },
    subject: { reference: subject },
    effectiveDateTime: new Date().toISOString(),
    valueQuantity: {
      value: Math.round((base + Math.random() * spread) * 10) / 10,
      unit,
      system: 'http://unitsofmeasure.org',
      code: unit,
    },
  };
}

// A uniformly chosen facility (with its token).
export function uniformFacility() {
  return facilities[Math.floor(Math.random() * facilities.length)];
}

// POST one GraphQL operation to the edge as `facility`; the body is kept so callers can check it.
export function graphqlPost(facility, query, variables, name) {
  return http.post(config.graphql, JSON.stringify({ query, variables: variables || {} }), {
    headers: {
      Authorization: `Bearer ${facility.token}`,
      'X-Facility-Id': facility.id,
      'Content-Type': 'application/json',
      Accept: 'application/json',
    },
    tags: { name },
    responseType: 'text',
  });
}

// A GraphQL answer counts as good when it is a 200 with data and no `errors` key.
export function graphqlOk(res) {
  return res.status === 200 && typeof res.body === 'string' && res.body.indexOf('"errors"') < 0 && res.body.indexOf('"data"') >= 0;
}
