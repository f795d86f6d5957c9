// The ceiling: GET / of the hello-world Starlette app (gateway/bench_ceiling.py), served by uvicorn
// with the same settings as `unihealth serve`. Every other row of the bench is a % of this RPS.
import http from 'k6/http';
import { check } from 'k6';
import { config, thresholds, SUMMARY_TREND_STATS } from './lib.js';

export const options = {
  thresholds: thresholds(),
  summaryTrendStats: SUMMARY_TREND_STATS,
};

export default function () {
  const res = http.get(`${config.base}/`, { tags: { name: 'ceiling' }, responseType: 'none' });
  check(res, { 'ceiling 200': (r) => r.status === 200 });
}
