// GET /fhir/r5/Patient/{id}/observations?_count=N, then follow the Bundle's `next` link once
// (two requests per iteration; the custom rate `observations_next_link` says how often a second
// page existed).
import http from 'k6/http';
import { check } from 'k6';
import { Rate } from 'k6/metrics';
import { config, readParams, thresholds, uniformPatient, SUMMARY_TREND_STATS } from './lib.js';

const hadNext = new Rate('observations_next_link');

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const p = uniformPatient();
  const first = http.get(
    `${config.fhir}/Patient/${p.id}/observations?_count=${config.pageSize}`,
    readParams(p.facility, 'observations', true),
  );
  check(first, { 'observations page 1 200': (r) => r.status === 200 });
  if (first.status !== 200) return;
  const next = (JSON.parse(first.body).link || []).find((l) => l.relation === 'next');
  hadNext.add(next !== undefined);
  if (next === undefined) return;
  const second = http.get(next.url, readParams(p.facility, 'observations-next', false));
  check(second, { 'observations page 2 200': (r) => r.status === 200 });
}
