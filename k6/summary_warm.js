// REST patient summary, warm cache: GET /fhir/r5/Patient/{id}/summary?encounters=N for a uniformly
// chosen patient of a hot set (the first HOT_PATIENTS of the data file, spread over the
// facilities). setup() reads each of them once, so every measured read is a summary-cache hit for
// as long as no change to that patient arrives and the TTL (UNIHEALTH_SUMMARY_TTL, 60 s) holds —
// the bench's "cache hit %" column, read from the edge's /metrics, shows how many really were.
import http from 'k6/http';
import { check, fail } from 'k6';
import { config, facilities, patients, readParams, thresholds, SUMMARY_TREND_STATS } from './lib.js';

const HOT_PATIENTS = Math.min(Number(__ENV.UNIHEALTH_HOT_PATIENTS || 100), patients.length);

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

function summaryUrl(p) {
  return `${config.fhir}/Patient/${p.id}/summary?encounters=${config.encounters}`;
}

export function setup() {
  for (let i = 0; i < HOT_PATIENTS; i++) {
    const p = patients[i];
    const res = http.get(summaryUrl(p), readParams(facilities[p.f], 'summary-fill', false));
    if (res.status !== 200) fail(`filling the cache: ${p.id} answered ${res.status}`);
  }
}

export default function () {
  const p = patients[Math.floor(Math.random() * HOT_PATIENTS)];
  const res = http.get(summaryUrl(p), readParams(facilities[p.f], 'summary', false));
  check(res, { 'summary 200': (r) => r.status === 200 });
}
