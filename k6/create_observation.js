// POST /fhir/r5/Observation: a vital sign for a uniformly chosen patient (Prefer: return=minimal).
import http from 'k6/http';
import { check } from 'k6';
import { config, thresholds, uniformPatient, vitalSign, writeParams, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const p = uniformPatient();
  const res = http.post(
    `${config.fhir}/Observation`,
    JSON.stringify(vitalSign(`Patient/${p.id}`)),
    writeParams(p.facility, 'create-observation'),
  );
  check(res, { 'create 201': (r) => r.status === 201 });
}
