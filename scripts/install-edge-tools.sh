#!/usr/bin/env bash
# Installs what building the Worker needs, once, into a cache outside the repo (so fresh
# clones and CI on the same machine reuse it): pinned wasm-bindgen-cli (exactly the
# lockfile's wasm-bindgen) and worker-build; npm packages (wrangler, binaryen, esbuild)
# from the committed package-lock.json; and, when rustup has no wasm32 target (offline
# machines), Debian's rustc-web toolchain whose std we rebuild with -Zbuild-std.
# Prints nothing on success when everything is already there. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
mkdir -p "$TOOLS/bin"

# Tools, built for a short build (no LTO, many codegen units, light optimisation): the
# Worker they produce is byte-for-byte the same, and a fresh machine waits 3m50s for both
# instead of about 6 minutes.
tool_profile=(CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
              CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=false)

wasm_bindgen_version="$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)"
worker_build_version="$(awk '/^name = "worker"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)"

if ! "$TOOLS/bin/wasm-bindgen" --version 2>/dev/null | grep -q " $wasm_bindgen_version\$"; then
    echo "installing wasm-bindgen-cli $wasm_bindgen_version into $TOOLS (a few minutes, once)" >&2
    # Not --locked: its lockfile pins a crate version missing from some registries.
    env "${tool_profile[@]}" cargo install -q wasm-bindgen-cli --version "=$wasm_bindgen_version" --root "$TOOLS" --force
fi
if ! "$TOOLS/bin/worker-build" --version 2>/dev/null | grep -q "$worker_build_version"; then
    echo "installing worker-build $worker_build_version into $TOOLS (a few minutes, once)" >&2
    env "${tool_profile[@]}" cargo install -q worker-build --version "=$worker_build_version" --locked --root "$TOOLS" --force
fi

# npm packages (and axe-core, injected by the console tests), pinned by package-lock.json;
# npm's own cache makes re-installs fast.
if [ ! -x node_modules/.bin/wrangler ] || [ ! -f node_modules/axe-core/axe.min.js ] \
    || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error >&2
fi

# No rustup wasm32 target (it cannot be downloaded here): use Debian's rustc-web.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    if ! /usr/bin/rustc --version 2>/dev/null | grep -qE '^rustc 1\.(9[1-9]|[1-9][0-9][0-9])'; then
        echo "installing Debian rustc-web (Rust >= 1.91 for the worker crate)" >&2
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        pkgs=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22)
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -q >/dev/null
        $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
fi
