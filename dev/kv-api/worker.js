// Local stand-in for Cloudflare's Workers KV REST API, for development and tests only
// (never deployed). It speaks the subset the control plane's KV sync uses — bulk put (with
// metadata), bulk delete, listing keys with a cursor, reading one value, bearer token, the
// {success, errors, messages, result} envelope — and writes the KV namespace bound as KEYS. Run by `wrangler dev` with the same --persist-to as the
// edge Worker, it updates the very KV the edge reads, so the control plane's real HTTP
// client is exercised end to end with no Cloudflare account.
//
// Test hooks: POST /__faults {"status": 503, "count": 5} makes the next 5 API calls fail
// with that status (a 429 carries Retry-After: 1); {"delayMs": 3000, "count": 1} makes the
// next call slow: it waits, then applies the write and answers — and applies it even when
// the caller gave up meanwhile, as a real API may (a timed-out request is not an undone
// one); {"unsuccessful": 2, "count": 1} makes the next call succeed as a whole but leave
// out the first 2 keys of its body and list them in `unsuccessful_keys`, as Cloudflare's
// bulk API may. Any of these with {"after": 3} spares the next 3 calls first.
// GET /__stats returns what was received (keys put and deleted, the last
// expiration_ttl per key); POST /__stats clears it. (A refusing
// target is a stopped one.)
//
// Propagation delay (what Workers KV does in production: a write reaches other locations
// only after a while): POST /__propagation {"delayMs": 60000} (or the PROPAGATION_DELAY_MS
// var at start) makes every write answer at once and apply only that much later — held by
// a Durable Object and applied by its alarm, so it happens even with no request here
// meanwhile; once one was held, later writes queue behind it even with no delay, so none
// overtakes another. GET /__propagation says the delay and how many writes are still held
// (`held` in /__stats counts those received that way; `puts`/`deletes` list them once
// applied).

const PREFIX = /^\/client\/v4\/accounts\/[^/]+\/storage\/kv\/namespaces\/([^/]+)\/(bulk|bulk\/delete|keys|values\/[^/]+)$/;
let faults = { status: 0, count: 0, delayMs: 0, unsuccessful: 0, after: 0 };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const emptyStats = () => ({ putRequests: 0, deleteRequests: 0, listRequests: 0, delayed: 0, held: 0, puts: [], deletes: [], ttls: {} });
let stats = emptyStats();
// Writes are applied this much after they are answered (null: the PROPAGATION_DELAY_MS var).
let propagationMs = null;
// Once a write was held, every later one goes through the same queue, delay or not, so
// that none overtakes a held one (a later put undone by an older held delete).
let everHeld = false;

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
    if (url.pathname === "/__propagation") {
      if (request.method === "POST") propagationMs = Number((await request.json()).delayMs) || 0;
      const held = await heldWrites(env).fetch("http://held/count");
      return new Response(JSON.stringify({ delayMs: delay(env), held: (await held.json()).held }),
        { headers: { "content-type": "application/json" } });
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
    if (faults.count > 0 && faults.after > 0) {
      faults.after--;
    } else if (faults.count > 0 && faults.unsuccessful > 0) {
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
    if (m[2].startsWith("values/")) {
      if (request.method !== "GET") return envelope(405, false, [{ code: 10000, message: "method not allowed" }]);
      const value = await env.KEYS.get(decodeURIComponent(m[2].slice("values/".length)));
      if (value === null) return envelope(404, false, [{ code: 10009, message: "get: 'key not found'" }]);
      return new Response(value);
    }
    if (m[2] === "keys") {
      if (request.method !== "GET") return envelope(405, false, [{ code: 10000, message: "method not allowed" }]);
      return list(url, env);
    }
    let body;
    try { body = await request.json(); } catch { return envelope(400, false, [{ code: 10026, message: "bad JSON" }]); }
    if (delayMs > 0) {
      stats.delayed++; // a test can wait for a held request instead of guessing
      // waitUntil: the late write happens even if the caller disconnects first.
      const late = sleep(delayMs).then(() => apply(m[2], request.method, body, env, 0));
      ctx.waitUntil(late);
      return late;
    }
    if ((delay(env) > 0 || everHeld) && skip === 0 && (m[2] === "bulk" || m[2] === "bulk/delete")) {
      const refused = invalid(m[2], request.method, body);
      if (refused) return refused;
      // Answered now (as Cloudflare does), visible to the Worker only later.
      everHeld = true;
      stats.held++;
      const due = Date.now() + delay(env);
      await heldWrites(env).fetch("http://held/hold", {
        method: "POST", body: JSON.stringify({ due, route: m[2], method: request.method, body }),
      });
      const keys = body.length;
      return envelope(200, true, [], { successful_key_count: keys, unsuccessful_keys: [] });
    }
    return apply(m[2], request.method, body, env, skip);
  },
};

const delay = (env) => propagationMs ?? (Number(env.PROPAGATION_DELAY_MS) || 0);
const heldWrites = (env) => env.HELD.get(env.HELD.idFromName("held"));

// Writes waiting for their propagation delay, in the order they came; the alarm applies
// those that are due, in that order, and waits for the next.
export class HeldWrites {
  constructor(state, env) {
    this.state = state;
    this.env = env;
  }

  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/count") {
      const held = await this.state.storage.list({ prefix: "w:" });
      return new Response(JSON.stringify({ held: held.size }));
    }
    const write = await request.json();
    const seq = ((await this.state.storage.get("seq")) ?? 0) + 1;
    await this.state.storage.put("seq", seq);
    await this.state.storage.put(`w:${String(seq).padStart(12, "0")}`, write);
    const alarm = await this.state.storage.getAlarm();
    if (alarm === null || alarm > write.due) await this.state.storage.setAlarm(write.due);
    return new Response("held");
  }

  async alarm() {
    const held = await this.state.storage.list({ prefix: "w:" });
    let next = null;
    for (const [key, write] of held) {
      if (write.due > Date.now()) { next = write.due; break; }
      await apply(write.route, write.method, write.body, this.env, 0);
      await this.state.storage.delete(key);
    }
    if (next !== null) await this.state.storage.setAlarm(next);
  }
}

// The error a write's request gets before anything is applied (null: none).
function invalid(route, method, body) {
  if (!Array.isArray(body) || body.length > 10000)
    return envelope(400, false, [{ code: 10026, message: "body must be an array of at most 10000 items" }]);
  if (!(route === "bulk" && method === "PUT") && !(route === "bulk/delete" && method === "POST"))
    return envelope(405, false, [{ code: 10000, message: "method not allowed" }]);
  return null;
}

// `skip`: how many of the first keys to leave unapplied and report as unsuccessful.
async function apply(route, method, body, env, skip) {
  const refused = invalid(route, method, body);
  if (refused) return refused;
  const unsuccessful = body.slice(0, skip).map((item) => (typeof item === "string" ? item : item.key));
  body = body.slice(skip);
  const result = { successful_key_count: body.length, unsuccessful_keys: unsuccessful };
  if (route === "bulk" && method === "PUT") {
    stats.putRequests++;
    await inGroups(body, (item) => {
      const options = item.expiration_ttl ? { expirationTtl: item.expiration_ttl } : {};
      if (item.metadata !== undefined) options.metadata = item.metadata;
      stats.puts.push(item.key);
      stats.ttls[item.key] = item.expiration_ttl ?? null;
      return env.KEYS.put(item.key, item.value, options);
    });
    return envelope(200, true, [], result);
  }
  if (route === "bulk/delete" && method === "POST") {
    stats.deleteRequests++;
    await inGroups(body, (key) => {
      stats.deletes.push(key);
      return env.KEYS.delete(key);
    });
    return envelope(200, true, [], result);
  }
  return envelope(405, false, [{ code: 10000, message: "method not allowed" }]);
}

// Applies `write` to every item, a few hundred at a time (a bulk call carries up to
// 10,000; one at a time made resyncing a large namespace needlessly slow).
async function inGroups(items, write) {
  for (let i = 0; i < items.length; i += 100) await Promise.all(items.slice(i, i + 100).map(write));
}

// GET …/keys?limit=&cursor=&prefix=: as Cloudflare's, one page of names (sorted, with
// expiration and metadata) and `result_info.cursor`, empty on the last page.
async function list(url, env) {
  const limit = Number(url.searchParams.get("limit") ?? 1000);
  if (!Number.isInteger(limit) || limit < 10 || limit > 1000)
    return envelope(400, false, [{ code: 10026, message: "limit must be 10 to 1000" }]);
  const options = { limit };
  const cursor = url.searchParams.get("cursor");
  if (cursor) options.cursor = cursor;
  const prefix = url.searchParams.get("prefix");
  if (prefix) options.prefix = prefix;
  stats.listRequests++;
  const page = await env.KEYS.list(options);
  const result = page.keys.map((k) => {
    const item = { name: k.name };
    if (k.expiration !== undefined) item.expiration = k.expiration;
    if (k.metadata !== undefined) item.metadata = k.metadata;
    return item;
  });
  const next = page.list_complete ? "" : page.cursor;
  return new Response(JSON.stringify({ success: true, errors: [], messages: [], result,
    result_info: { count: result.length, cursor: next } }), {
    headers: { "content-type": "application/json" },
  });
}
