// Edge benchmark: our Rust Worker against JavaScript baselines, all under workerd via
// Miniflare's API (the engine `wrangler dev` uses, without wrangler's Node proxy in the
// request path, which otherwise caps every Worker at ~400 req/s here). Load from wrk.
// Env: ORIGIN_URL (a fast origin), METLO_KEY (a valid key), METLO_LIMITED_KEY (a valid key
// with a rate limit it never reaches), METLO_METERED_KEY (one with credits it never spends),
// CONTROL_PLANE_URL / CONTROL_PLANE_KEY (a running
// control plane and an edge key for it: the Worker reads its revocation feed) and
// CONTROL_PLANE_METRICS (its /metrics, to count the feed requests), BEFORE_WORKER (optional: another build of our
// Worker, measured alongside as "before"), ROUNDS, SECONDS.
import { Miniflare } from "miniflare";
import { spawnSync } from "node:child_process";
import { get } from "node:http";
import { createHash } from "node:crypto";
import { gzipSync } from "node:zlib";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..", "..");
const ORIGIN_URL = process.env.ORIGIN_URL;
const KEY = process.env.METLO_KEY;
const LIMITED_KEY = process.env.METLO_LIMITED_KEY;
const METERED_KEY = process.env.METLO_METERED_KEY;
const BEFORE_WORKER = process.env.BEFORE_WORKER || "";
const CONTROL_PLANE_URL = process.env.CONTROL_PLANE_URL;
const CONTROL_PLANE_KEY = process.env.CONTROL_PLANE_KEY;
const CONTROL_PLANE_METRICS = process.env.CONTROL_PLANE_METRICS;
const ROUNDS = Number(process.env.ROUNDS || 3);
const SECONDS = Number(process.env.SECONDS || 5);
const PATH = "/api/v1/verify";
if (!ORIGIN_URL || !KEY || !LIMITED_KEY || !METERED_KEY || !CONTROL_PLANE_URL || !CONTROL_PLANE_KEY || !CONTROL_PLANE_METRICS)
  throw new Error("ORIGIN_URL, METLO_KEY, METLO_LIMITED_KEY, METLO_METERED_KEY, CONTROL_PLANE_URL, CONTROL_PLANE_KEY and CONTROL_PLANE_METRICS must be set");

const hash = createHash("sha256").update(KEY).digest("hex");
const record = JSON.stringify({ v: 1, name: "bench", for: "GENERIC", identifier: KEY.slice(0, 14), created: "2026-01-01T00:00:00.000Z" });
// The same key as the authorization variant holds it: with the permission its route needs.
const scopedRecord = JSON.stringify({ v: 3, name: "bench", for: "GENERIC", identifier: KEY.slice(0, 14),
  created: "2026-01-01T00:00:00.000Z", permissions: ["bench:read"] });
// A 20-rule route policy whose last rule is the one the benchmark's route matches (each
// request walks all 20), as the Worker reads it (`RoutePolicy::to_lines`).
const policy = ["1 deny",
  ...Array.from({ length: 19 }, (_, i) => `GET,POST /api/v1/thing${i}/** thing${i}:read AND (thing${i}:write OR admin)`),
  "GET /api/v1/verify bench:read"].join("\n");
// An ES256 signing key, as POST /api/v1/assertion-keys gives it (made here: no control
// plane call needed).
const signing = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
const signingJwk = JSON.stringify({ ...(await crypto.subtle.exportKey("jwk", signing.privateKey)), kid: "bench", alg: "ES256" });
const limitedHash = createHash("sha256").update(LIMITED_KEY).digest("hex");
const limitedRecord = JSON.stringify({ v: 2, name: "bench-limited", for: "GENERIC", identifier: LIMITED_KEY.slice(0, 14),
  created: "2026-01-01T00:00:00.000Z", rateLimit: { requests: 1000000000, periodSeconds: 60 } });
// And a metered one (credits it never spends: 10^12), as the control plane writes it.
const meteredHash = createHash("sha256").update(METERED_KEY).digest("hex");
const meteredRecord = JSON.stringify({ v: 4, name: "bench-metered", for: "GENERIC", identifier: METERED_KEY.slice(0, 14),
  created: "2026-01-01T00:00:00.000Z", credits: "1/1000000000000/0/0/0/0" });
// Our Worker's bindings besides KV: the per-key limiter and the miss limiter.
const ours = { durableObjects: { KEY_LIMITER: { className: "KeyLimiter", useSQLite: true } },
  ratelimits: { MISS_LIMITER: { simple: { limit: 30, period: 60 } } },
  modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"] }] };
const common = { compatibilityDate: "2025-09-01", modules: true, kvNamespaces: ["KEYS"],
  bindings: { ORIGIN_URL, CONTROL_PLANE_URL, CONTROL_PLANE_KEY } };
const workers = {
  rust: { ...common, ...ours, scriptPath: join(root, "edge/build/index.js") },
  // The same Worker without the revocation feed: what reading it costs the valid-key path.
  rustNoFeed: { ...common, ...ours, bindings: { ...common.bindings, REVOCATION_FEED_INTERVAL_MS: "0" },
    scriptPath: join(root, "edge/build/index.js") },
  // Without the feed, with a 20-rule route policy (from KV) and a signed assertion on every
  // proxied request: what authorization at the edge costs, against rustNoFeed.
  rustAuthz: { ...common, ...ours, bindings: { ...common.bindings, REVOCATION_FEED_INTERVAL_MS: "0",
    ASSERTION_SIGNING_KEY: signingJwk, ASSERTION_AUDIENCE: "bench" }, scriptPath: join(root, "edge/build/index.js") },
  // (Without the Durable Object binding: a build from before limits has no such class.)
  ...(BEFORE_WORKER ? { before: { ...common, modulesRules: ours.modulesRules, scriptPath: BEFORE_WORKER } } : {}),
  js: { ...common, scriptPath: join(here, "js-auth.js") },
  // Baselines built exactly like ours (same worker crate, toolchain and wasm-opt): the
  // ratios against these measure what our checks cost.
  rustPassthrough: { ...rustBaseline("passthrough") },
  rustEmpty: { ...rustBaseline("empty") },
  // JavaScript baselines: the same, without the worker crate's JS↔wasm cost.
  passthrough: { ...common, scriptPath: join(here, "passthrough.js") },
  empty: { ...common, scriptPath: join(here, "empty.js") },
};
function rustBaseline(mode) {
  return { ...common, bindings: { ...common.bindings, MODE: mode },
    scriptPath: join(here, "rust-baseline/build/index.js"), modulesRules: [{ type: "CompiledWasm", include: ["**/*.wasm"] }] };
}

async function start(name) {
  const t0 = performance.now();
  const mf = new Miniflare(workers[name]);
  const url = (await mf.ready).toString().replace(/\/$/, "");
  const kv = await mf.getKVNamespace("KEYS");
  await kv.put(hash, name === "rustAuthz" ? scopedRecord : record);
  if (name === "rustAuthz") await kv.put("policy", policy);
  await kv.put(limitedHash, limitedRecord);
  await kv.put(meteredHash, meteredRecord);
  const first = await fetch(url + PATH, { headers: { Authorization: KEY } });
  await first.arrayBuffer();
  return { mf, url, startupMs: performance.now() - t0, firstStatus: first.status };
}

// The workerd process serving a URL, and its CPU time: CPU per request does not depend on
// how busy the shared machine is, unlike req/s.
function workerdPid(url) {
  const port = new URL(url).port;
  const out = spawnSync("ss", ["-ltnpH", `sport = :${port}`], { encoding: "utf8" }).stdout;
  return Number((out.match(/pid=(\d+)/) || [])[1]) || null;
}
function cpuTicks(pid) {
  if (!pid) return NaN;
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]); // utime + stime, in 1/100 s
}

function wrk(url, key) {
  const args = ["-t1", "-c16", `-d${SECONDS}s`];
  if (key) args.push("-H", `Authorization: ${key}`);
  const pid = workerdPid(url);
  const before = cpuTicks(pid);
  const out = spawnSync("wrk", [...args, url + PATH], { encoding: "utf8" });
  const cpu = cpuTicks(pid) - before;
  const rps = Number((out.stdout.match(/Requests\/sec:\s+([\d.]+)/) || [])[1]);
  const requests = Number((out.stdout.match(/(\d+) requests in/) || [])[1]);
  const non2xx = Number((out.stdout.match(/Non-2xx or 3xx responses:\s+(\d+)/) || [0, 0])[1]);
  if (!rps) throw new Error("wrk failed: " + out.stdout + out.stderr);
  return { rps, non2xx, cpuUs: (cpu * 10000) / requests };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const started = {};
for (const name of Object.keys(workers)) started[name] = await start(name);
if (started.rust.firstStatus !== 200 || started.js.firstStatus !== 200 || started.rustAuthz.firstStatus !== 200)
  throw new Error(`warm-up failed: rust ${started.rust.firstStatus}, js ${started.js.firstStatus}, authz ${started.rustAuthz.firstStatus}`);
// The policy is enforced, not skipped: a route it does not allow is refused.
{
  const refused = await fetch(started.rustAuthz.url + "/api/v1/thing3/x", { headers: { Authorization: KEY } });
  await refused.arrayBuffer();
  if (refused.status !== 403) throw new Error(`the authorization variant answered ${refused.status} on a forbidden route`);
}

// Feed requests the control plane received (all routes' counters for it, summed).
// On a connection of its own each time: the control plane closes idle connections, and
// one kept between the runs could be closed just as it is used again.
async function feedRequests() {
  const text = await new Promise((resolve, reject) => {
    get(CONTROL_PLANE_METRICS, { agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8").on("data", (chunk) => { body += chunk; }).on("end", () => resolve(body));
    }).on("error", reject);
  });
  return text.split("\n").filter((l) => l.startsWith("http_requests_total") && l.includes('route="/api/v1/revocations"'))
    .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
}
let feedSeconds = 0, feedCount = 0;
const runs = { rust: [], rustNoFeed: [], rustAuthz: [], js: [], passthrough: [], empty: [], rustGarbage: [], rustPassthrough: [], rustEmpty: [], rustLimited: [], rustMetered: [],
  ...(BEFORE_WORKER ? { before: [], beforeGarbage: [] } : {}) };
const cpu = Object.fromEntries(Object.keys(runs).map((k) => [k, []]));
console.log(`edge throughput under workerd (Miniflare API), wrk -t1 -c16 -d${SECONDS}s, ${ROUNDS} interleaved rounds, medians`);
for (let round = 1; round <= ROUNDS; round++) {
  const p = wrk(started.passthrough.url, KEY);
  const feedBefore = await feedRequests();
  const r = wrk(started.rust.url, KEY);
  feedCount += (await feedRequests()) - feedBefore; feedSeconds += SECONDS;
  const nf = wrk(started.rustNoFeed.url, KEY);
  const az = wrk(started.rustAuthz.url, KEY);
  const j = wrk(started.js.url, KEY);
  const e = wrk(started.empty.url, "garbage");
  const g = wrk(started.rust.url, "garbage");
  const rp = wrk(started.rustPassthrough.url, KEY);
  const re = wrk(started.rustEmpty.url, "garbage");
  const l = wrk(started.rust.url, LIMITED_KEY);
  const mt = wrk(started.rust.url, METERED_KEY);
  const b = BEFORE_WORKER ? wrk(started.before.url, KEY) : null;
  const bg = BEFORE_WORKER ? wrk(started.before.url, "garbage") : null;
  runs.rustNoFeed.push(nf.rps); cpu.rustNoFeed.push(nf.cpuUs);
  runs.rustAuthz.push(az.rps); cpu.rustAuthz.push(az.cpuUs);
  if (r.non2xx || nf.non2xx || az.non2xx || j.non2xx || p.non2xx || rp.non2xx || l.non2xx || mt.non2xx || b?.non2xx) throw new Error("a valid-key request failed");
  runs.rustLimited.push(l.rps); cpu.rustLimited.push(l.cpuUs);
  runs.rustMetered.push(mt.rps); cpu.rustMetered.push(mt.cpuUs);
  if (b) { runs.before.push(b.rps); runs.beforeGarbage.push(bg.rps); cpu.before.push(b.cpuUs); cpu.beforeGarbage.push(bg.cpuUs); }
  runs.passthrough.push(p.rps); runs.rust.push(r.rps); runs.js.push(j.rps); runs.empty.push(e.rps); runs.rustGarbage.push(g.rps);
  runs.rustPassthrough.push(rp.rps); runs.rustEmpty.push(re.rps);
  for (const [k, v] of Object.entries({ rust: r, js: j, passthrough: p, empty: e, rustGarbage: g, rustPassthrough: rp, rustEmpty: re }))
    cpu[k].push(v.cpuUs);
  console.log(`  round ${round}: ours ${r.rps.toFixed(0)} | ours without the feed ${nf.rps.toFixed(0)} | ours with policy + assertion ${az.rps.toFixed(0)} | ours limited ${l.rps.toFixed(0)} | ours metered ${mt.rps.toFixed(0)} |${b ? ` before ${b.rps.toFixed(0)} | before garbage ${bg.rps.toFixed(0)} |` : ""} ours garbage ${g.rps.toFixed(0)} | rust pass-through ${rp.rps.toFixed(0)} | rust empty ${re.rps.toFixed(0)} | js auth ${j.rps.toFixed(0)} | js pass-through ${p.rps.toFixed(0)} | js empty ${e.rps.toFixed(0)} req/s`);
}
const m = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, median(v)]));
const c = Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, median(v)]));
console.log(`  valid key (isolate/KV hit), proxied: ours ${m.rust.toFixed(0)} req/s`);
console.log(`    ÷ empty pass-through Worker, Rust (${m.rustPassthrough.toFixed(0)}): ${(m.rust / m.rustPassthrough).toFixed(2)}  (target >= 0.90)`);
console.log(`    ÷ JavaScript Worker, KV get + WebCrypto SHA-256 (${m.js.toFixed(0)}): ${(m.rust / m.js).toFixed(2)}  (target >= 1.0)`);
console.log(`    ÷ empty pass-through Worker, JavaScript (${m.passthrough.toFixed(0)}): ${(m.rust / m.passthrough).toFixed(2)}  (for reference)`);
console.log(`    ÷ the same Worker without the revocation feed (${m.rustNoFeed.toFixed(0)}): ${(m.rust / m.rustNoFeed).toFixed(3)} by req/s, ${(c.rustNoFeed / c.rust).toFixed(3)} by CPU  (target >= 0.97)`);
console.log(`    with a 20-rule route policy and a signed assertion ÷ without either (both without the feed; ${m.rustNoFeed.toFixed(0)}): ${(m.rustAuthz / m.rustNoFeed).toFixed(3)} by req/s, ${(c.rustNoFeed / c.rustAuthz).toFixed(3)} by CPU  (target >= 0.95); CPU per request ${c.rustAuthz.toFixed(0)} vs ${c.rustNoFeed.toFixed(0)} µs`);
console.log(`    feed requests the control plane received meanwhile: ${(feedCount / feedSeconds).toFixed(2)}/s (one location, ${feedCount} in ${feedSeconds} s)`);
console.log(`  garbage key: ours ${m.rustGarbage.toFixed(0)} req/s`);
console.log(`    ÷ empty Worker, Rust (${m.rustEmpty.toFixed(0)}): ${(m.rustGarbage / m.rustEmpty).toFixed(2)}  (target >= 0.95)`);
console.log(`    ÷ empty Worker, JavaScript (${m.empty.toFixed(0)}): ${(m.rustGarbage / m.empty).toFixed(2)}  (for reference: the worker crate's JS↔wasm cost)`);
console.log(`  workerd CPU per request (µs, medians; robust to machine load): ours ${c.rust.toFixed(0)} | rust pass-through ${c.rustPassthrough.toFixed(0)} | js auth ${c.js.toFixed(0)} | ours garbage ${c.rustGarbage.toFixed(0)} | rust empty ${c.rustEmpty.toFixed(0)} | js empty ${c.empty.toFixed(0)}`);
console.log(`  the JavaScript floor for a refusal: garbage ÷ js empty ${(c.empty / c.rustGarbage).toFixed(2)} by CPU, ${(m.rustGarbage / m.empty).toFixed(2)} by req/s (target >= 0.87)`);
console.log(`  a rate-limited key (leases: one Durable Object call per up to 65 requests): ${c.rustLimited.toFixed(0)} µs CPU, +${(c.rustLimited - c.rust).toFixed(0)} µs over an unlimited key; ÷ unlimited ${(m.rustLimited / m.rust).toFixed(2)} by req/s, ${(c.rust / c.rustLimited).toFixed(2)} by CPU (target >= 0.8; ${m.rustLimited.toFixed(0)} req/s)`);
console.log(`  a metered key (credits, leased alike): ${c.rustMetered.toFixed(0)} µs CPU, +${(c.rustMetered - c.rust).toFixed(0)} µs over an unlimited key; ÷ unlimited ${(m.rustMetered / m.rust).toFixed(2)} by req/s, ${(c.rust / c.rustMetered).toFixed(2)} by CPU (target >= 0.8; ${m.rustMetered.toFixed(0)} req/s)`);
if (BEFORE_WORKER)
  console.log(`  against the build before (EDGE_BASELINE): unlimited valid key ${c.rust.toFixed(0)} vs ${c.before.toFixed(0)} µs CPU (${((c.rust / c.before - 1) * 100).toFixed(1)} %, target within 3 %), req/s ratio ${(m.rust / m.before).toFixed(2)}; garbage ${c.rustGarbage.toFixed(0)} vs ${c.beforeGarbage.toFixed(0)} µs (${((c.rustGarbage / c.beforeGarbage - 1) * 100).toFixed(1)} %)`);
console.log(`    as throughput ratios: valid ÷ rust pass-through ${(c.rustPassthrough / c.rust).toFixed(2)} (target >= 0.90), ÷ js auth ${(c.js / c.rust).toFixed(2)} (target >= 1.0); garbage ÷ rust empty ${(c.rustEmpty / c.rustGarbage).toFixed(2)} (target >= 0.95)`);
const wasm = readFileSync(join(root, "edge/build/index_bg.wasm"));
const js = readFileSync(join(root, "edge/build/index.js"));
console.log(`  bundle: wasm ${(wasm.length / 1024).toFixed(0)} KiB raw, ${gzipSync(wasm, { level: 9 }).length} B gzip (target <= 144000); JS glue ${(js.length / 1024).toFixed(0)} KiB raw, ${gzipSync(js, { level: 9 }).length} B gzip`);
for (const s of Object.values(started)) await s.mf.dispose();
// Startup: fresh instances, after everything else (the first start also warms Node up).
const startup = {};
for (const name of ["rust", "js", "empty"]) {
  const times = [];
  for (let i = 0; i < 3; i++) {
    const s = await start(name);
    times.push(s.startupMs);
    await s.mf.dispose();
  }
  startup[name] = median(times);
}
console.log(`  startup to first response, median of 3 (workerd process start included): ours ${startup.rust.toFixed(0)} ms, js auth ${startup.js.toFixed(0)} ms, js empty ${startup.empty.toFixed(0)} ms; ours ÷ js auth ${(startup.rust / startup.js).toFixed(2)} (target <= 1.5)`);
