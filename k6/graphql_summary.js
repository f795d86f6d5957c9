// GraphQL single-patient summary: POST /graphql, the SUMMARY operation of gateway/federation/bench.py
// (patient, encounters, allergies, conditions from the patient subgraph; latest vitals from the
// observation subgraph; active medication requests from the medication subgraph) for a uniformly
// chosen patient of any facility. A 200 with an `errors` key is a failed check.
import { check } from 'k6';
import { config, graphqlOk, graphqlPost, thresholds, uniformPatient, SUMMARY_TREND_STATS } from './lib.js';

if (!config.queries.summary) {
  throw new Error('the data file has no queries.summary (written by `unihealth bench`)');
}

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const p = uniformPatient();
  const res = graphqlPost(p.facility, config.queries.summary, { id: p.id }, 'graphql-summary');
  check(res, { 'graphql summary 200 without errors': graphqlOk });
}
