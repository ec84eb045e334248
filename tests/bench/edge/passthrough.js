// Baseline: an empty pass-through Worker. Proxies every request to the origin, no auth.
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    return fetch(env.ORIGIN_URL + url.pathname + url.search, request);
  },
};
