// Baseline for refusals: the least a Worker can do to answer (a constant 401).
export default {
  async fetch() {
    return new Response('{"error":"unauthorized"}', { status: 401, headers: { "content-type": "application/json" } });
  },
};
