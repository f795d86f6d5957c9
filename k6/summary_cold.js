// REST patient summary, cold cache: every iteration asks a summary no one asked before in this
// run, so each read misses the summary cache and assembles it from the store (then stores it).
// Iteration i of the test reads patient i mod P with encounters = 6 + floor(i / P) mod 45 — never
// the warm scenario's N (5), and P x 45 distinct keys before any repeats (90,000 at 2,000 patients).
import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { config, facilities, patients, readParams, thresholds, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const i = exec.scenario.iterationInTest;
  const p = patients[i % patients.length];
  const encounters = 6 + (Math.floor(i / patients.length) % 45);
  const res = http.get(
    `${config.fhir}/Patient/${p.id}/summary?encounters=${encounters}`,
    readParams(facilities[p.f], 'summary', false),
  );
  check(res, { 'summary 200': (r) => r.status === 200 });
}
