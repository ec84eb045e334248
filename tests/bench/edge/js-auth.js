// Baseline: an idiomatic JavaScript Worker doing what ours does on a KV hit —
// SHA-256 of the key with WebCrypto, KV get (with cacheTtl), expiry check, proxy with
// identity headers. (No checksum or isolate cache: what a typical JS Worker would write.)
export default {
  async fetch(request, env) {
    const auth = request.headers.get("Authorization") || "";
    const key = auth.startsWith("Bearer ") ? auth.slice(7) : auth;
    if (!key) return unauthorized();
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(key));
    const hash = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    const record = await env.KEYS.get(hash, { type: "json", cacheTtl: 30 });
    if (!record || (record.expires && Date.now() / 1000 >= record.expires)) return unauthorized();
    const url = new URL(request.url);
    const headers = new Headers(request.headers);
    headers.delete("Authorization");
    headers.set("X-Metlo-Key-Name", record.name);
    headers.set("X-Metlo-Key-Type", record.for);
    headers.set("X-Metlo-Key-Identifier", record.identifier);
    return fetch(env.ORIGIN_URL + url.pathname + url.search, {
      method: request.method, headers, body: request.body, redirect: "manual",
    });
  },
};

function unauthorized() {
  return new Response('{"error":"unauthorized"}', { status: 401, headers: { "content-type": "application/json" } });
}
