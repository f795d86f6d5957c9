// A clinician's mixed workload: 90 % reads, 10 % writes, patients chosen Pareto-distributed (a few
// are hot, most are rarely touched), every facility represented.
//   35 % patient summary · 30 % first page of /observations · 25 % read Patient · 10 % create Observation
// Every request is tagged `name`, and each kind has its own P95 threshold as well as the overall ones.
import http from 'k6/http';
import { check } from 'k6';
import { config, P95_MS, paretoPatient, readParams, thresholds, vitalSign, writeParams, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds({
    [`http_req_duration{name:summary}`]: [`p(95)<${P95_MS}`],
    [`http_req_duration{name:observations}`]: [`p(95)<${P95_MS}`],
    [`http_req_duration{name:read-patient}`]: [`p(95)<${P95_MS}`],
    [`http_req_duration{name:create-observation}`]: [`p(95)<${P95_MS}`],
  }),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const p = paretoPatient();
  const roll = Math.random();
  let res;
  if (roll < 0.35) {
    res = http.get(`${config.fhir}/Patient/${p.id}/summary?encounters=${config.encounters}`, readParams(p.facility, 'summary', false));
    check(res, { 'summary 200': (r) => r.status === 200 });
  } else if (roll < 0.65) {
    res = http.get(`${config.fhir}/Patient/${p.id}/observations?_count=${config.pageSize}`, readParams(p.facility, 'observations', false));
    check(res, { 'observations 200': (r) => r.status === 200 });
  } else if (roll < 0.9) {
    res = http.get(`${config.fhir}/Patient/${p.id}`, readParams(p.facility, 'read-patient', false));
    check(res, { 'read 200': (r) => r.status === 200 });
  } else {
    res = http.post(`${config.fhir}/Observation`, JSON.stringify(vitalSign(`Patient/${p.id}`)), writeParams(p.facility, 'create-observation'));
    check(res, { 'create 201': (r) => r.status === 201 });
  }
}
