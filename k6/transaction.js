// POST /fhir/r5 a transaction Bundle: a new Patient and 3 Observations that reference it by
// urn:uuid (resolved by the server inside the caller's facility), atomically. The facility is
// chosen uniformly (the patient list only picks a facility here).
import http from 'k6/http';
import { check } from 'k6';
import { config, thresholds, uniformPatient, uuid4, vitalSign, writeParams, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

const FAMILY = ['Okafor', 'Lindqvist', 'Moreau', 'Tanaka', 'Silva', 'Novak', 'Haddad', 'Kowalski'];
const GIVEN = ['Ada', 'Jonas', 'Ines', 'Kenji', 'Maya', 'Luca', 'Noor', 'Piotr'];

function bundle() {
  const patientUrl = `urn:uuid:${uuid4()}`;
  const entries = [
    {
      fullUrl: patientUrl,
      resource: {
        resourceType: 'Patient',
        name: [{ family: FAMILY[(Math.random() * FAMILY.length) | 0], given: [GIVEN[(Math.random() * GIVEN.length) | 0]] }],
        gender: Math.random() < 0.5 ? 'female' : 'male',
        birthDate: `19${50 + ((Math.random() * 50) | 0)}-0${1 + ((Math.random() * 9) | 0)}-1${(Math.random() * 9) | 0}`,
      },
      request: { method: 'POST', url: 'Patient' },
    },
  ];
  for (let i = 0; i < 3; i++) {
    entries.push({
      fullUrl: `urn:uuid:${uuid4()}`,
      resource: vitalSign(patientUrl),
      request: { method: 'POST', url: 'Observation' },
    });
  }
  return { resourceType: 'Bundle', type: 'transaction', entry: entries };
}

export default function () {
  const p = uniformPatient();
  const res = http.post(`${config.fhir}/`, JSON.stringify(bundle()), writeParams(p.facility, 'transaction'));
  check(res, { 'transaction 200': (r) => r.status === 200 });
}
