// Local stand-in for Cloudflare's Workers KV REST API, for development and tests only
// (never deployed). It speaks the subset the control plane's KV sync uses — bulk put and
// bulk delete, bearer token, the {success, errors, messages, result} envelope — and writes
// the KV namespace bound as KEYS. Run by `wrangler dev` with the same --persist-to as the
// edge Worker, it updates the very KV the edge reads, so the control plane's real HTTP
// client is exercised end to end with no Cloudflare account.
//
// Test hooks: POST /__faults {"status": 503, "count": 5} makes the next 5 API calls fail
// with that status (a 429 carries Retry-After: 1); {"delayMs": 3000, "count": 1} makes the
// next call slow: it waits, then applies the write and answers — and applies it even when
// the caller gave up meanwhile, as a real API may (a timed-out request is not an undone
// one); {"unsuccessful": 2, "count": 1} makes the next call succeed as a whole but leave
// out the first 2 keys of its body and list them in `unsuccessful_keys`, as Cloudflare's
// bulk API may. GET /__stats returns what was received (keys put and deleted, the last
// expiration_ttl per key); POST /__stats clears it. (A refusing
// target is a stopped one.)

const PREFIX = /^\/client\/v4\/accounts\/[^/]+\/storage\/kv\/namespaces\/([^/]+)\/(bulk|bulk\/delete)$/;
let faults = { status: 0, count: 0, delayMs: 0, unsuccessful: 0 };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const emptyStats = () => ({ putRequests: 0, deleteRequests: 0, puts: [], deletes: [], ttls: {} });
let stats = emptyStats();

const envelope = (status, ok, errors = [], result = null) =>
  new Response(JSON.stringify({ success: ok, errors, messages: [], result }), {
    status, headers: { "content-type": "application/json" },
  });

export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (url.pathname === "/__faults" && request.method === "POST") {
      faults = await request.json();
      return envelope(200, true);
    }
    if (url.pathname === "/__stats") {
      if (request.method === "POST") stats = emptyStats();
      return new Response(JSON.stringify(stats), { headers: { "content-type": "application/json" } });
    }
    const m = url.pathname.match(PREFIX);
    if (!m) return envelope(404, false, [{ code: 7003, message: "No route for that URI" }]);
    if (m[1] !== env.NAMESPACE_ID) return envelope(404, false, [{ code: 10013, message: "namespace not found" }]);
    if (request.headers.get("Authorization") !== `Bearer ${env.API_TOKEN}`)
      return envelope(403, false, [{ code: 10000, message: "Authentication error" }]);
    let delayMs = 0;
    let skip = 0;
    if (faults.count > 0 && faults.unsuccessful > 0) {
      faults.count--;
      skip = faults.unsuccessful;
    } else if (faults.count > 0 && faults.delayMs > 0) {
      faults.count--;
      delayMs = faults.delayMs;
    } else if (faults.count > 0) {
      faults.count--;
      const headers = faults.status === 429 ? { "retry-after": "1" } : {};
      return new Response(JSON.stringify({ success: false, errors: [{ code: 10001, message: "injected fault" }] }),
        { status: faults.status, headers: { "content-type": "application/json", ...headers } });
    }
    let body;
    try { body = await request.json(); } catch { return envelope(400, false, [{ code: 10026, message: "bad JSON" }]); }
    if (delayMs > 0) {
      // waitUntil: the late write happens even if the caller disconnects first.
      const late = sleep(delayMs).then(() => apply(m[2], request.method, body, env, 0));
      ctx.waitUntil(late);
      return late;
    }
    return apply(m[2], request.method, body, env, skip);
  },
};

// `skip`: how many of the first keys to leave unapplied and report as unsuccessful.
async function apply(route, method, body, env, skip) {
  if (!Array.isArray(body) || body.length > 10000)
    return envelope(400, false, [{ code: 10026, message: "body must be an array of at most 10000 items" }]);
  const unsuccessful = body.slice(0, skip).map((item) => (typeof item === "string" ? item : item.key));
  body = body.slice(skip);
  const result = { successful_key_count: body.length, unsuccessful_keys: unsuccessful };
  if (route === "bulk" && method === "PUT") {
    stats.putRequests++;
    for (const item of body) {
      const options = item.expiration_ttl ? { expirationTtl: item.expiration_ttl } : {};
      await env.KEYS.put(item.key, item.value, options);
      stats.puts.push(item.key);
      stats.ttls[item.key] = item.expiration_ttl ?? null;
    }
    return envelope(200, true, [], result);
  }
  if (route === "bulk/delete" && method === "POST") {
    stats.deleteRequests++;
    for (const key of body) {
      await env.KEYS.delete(key);
      stats.deletes.push(key);
    }
    return envelope(200, true, [], result);
  }
  return envelope(405, false, [{ code: 10000, message: "method not allowed" }]);
}
