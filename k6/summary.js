// REST patient summary: GET /fhir/r5/Patient/{id}/summary?encounters=N for a uniformly chosen
// patient of any facility. The summary cache fills during the run (first read of a patient cold,
// later reads warm); the bench labels the row "summary (cache filling)".
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
