#!/usr/bin/env bash
# Installs the JWT libraries the assertion tests verify with, once, outside the repo:
# PyJWT (with `cryptography`, for ES256) in a virtualenv. (`jose`, the npm one, comes with
# the other npm packages: package-lock.json.) Prints the venv's python. Safe to run again.
set -euo pipefail
TOOLS="${METLO_TOOLS_DIR:-$HOME/.cache/metlo-edge-auth/tools}"
venv="$TOOLS/verifiers-venv"
pyjwt=2.10.1
cryptography=44.0.2
if ! "$venv/bin/python" -c "import jwt, cryptography, sys; sys.exit(jwt.__version__ != '$pyjwt')" 2>/dev/null; then
    echo "installing PyJWT $pyjwt into $venv (once)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "pyjwt==$pyjwt" "cryptography==$cryptography" >&2
fi
echo "$venv/bin/python"
