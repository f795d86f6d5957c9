// GraphQL 30-patient ward: POST /graphql, the WARD operation of gateway/federation/bench.py (the
// first 30 patients of a facility, each with latest vitals, active medication requests and
// allergies: all three subgraphs, batched) for a uniformly chosen facility. A 200 with an `errors`
// key is a failed check.
import { check } from 'k6';
import { config, graphqlOk, graphqlPost, thresholds, uniformFacility, SUMMARY_TREND_STATS } from './lib.js';

if (!config.queries.ward) {
  throw new Error('the data file has no queries.ward (written by `unihealth bench`)');
}

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const res = graphqlPost(uniformFacility(), config.queries.ward, {}, 'graphql-ward');
  check(res, { 'graphql ward 200 without errors': graphqlOk });
}
