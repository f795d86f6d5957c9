// REST patient summary: GET /fhir/r5/Patient/{id}/summary?encounters=N for a uniformly chosen
// patient of any facility. There is no cache yet, so this is neither "warm" nor "cold": the
// warm/cold split arrives with the cache (the bench labels the row "summary (no cache yet)").
import http from 'k6/http';
import { check } from 'k6';
import { config, readParams, thresholds, uniformPatient, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const p = uniformPatient();
  const res = http.get(
    `${config.fhir}/Patient/${p.id}/summary?encounters=${config.encounters}`,
    readParams(p.facility, 'summary', false),
  );
  check(res, { 'summary 200': (r) => r.status === 200 });
}
