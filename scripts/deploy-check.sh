#!/usr/bin/env bash
# Checks that the Worker deploys as documented, without deploying (no Cloudflare account
# needed): `wrangler deploy --dry-run --env production` bundles it with the production
# settings, and wrangler.toml holds no secret in any [vars] and no local URL in
# production's.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-worker.sh
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
CI=true WRANGLER_SEND_METRICS=false npx wrangler deploy --dry-run --env production \
    --outdir "$out" >"$out/log" 2>&1 || { cat "$out/log" >&2; exit 1; }
ls "$out"/*.wasm >/dev/null 2>&1 || { echo "deploy-check: no wasm in the bundle" >&2; cat "$out/log" >&2; exit 1; }
python3 - <<'PY'
import sys, tomllib
config = tomllib.load(open("wrangler.toml", "rb"))
secrets = {"CONTROL_PLANE_KEY", "ORIGIN_SECRET"}
problems = []
envs = {"(top level)": config, **{f"env.{k}": v for k, v in config.get("env", {}).items()}}
for name, env in envs.items():
    leaked = secrets & set(env.get("vars", {}))
    if leaked:
        problems.append(f"{name} [vars] holds secrets: {sorted(leaked)} (use wrangler secret put)")
prod = config.get("env", {}).get("production", {}).get("vars", {})
for var in ("ORIGIN_URL", "CONTROL_PLANE_URL"):
    value = prod.get(var)
    if value is None:
        problems.append(f"env.production.vars lacks {var}")
    elif "127.0.0.1" in value or "localhost" in value:
        problems.append(f"env.production.vars {var} points at this machine: {value}")
if problems:
    sys.exit("deploy-check: " + "; ".join(problems))
print("deploy-check: wrangler deploy --dry-run --env production bundled the Worker; no secret in [vars]")
PY
