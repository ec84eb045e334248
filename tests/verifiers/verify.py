"""Verifies the edge's assertions with PyJWT (PyPI), as a FastAPI origin would.

Input (argv[1], JSON): {jwks, issuer, cases: [{name, token, audience, expect}]}, where
expect is "accept" or "reject". Prints one line per case; exits 1 if any case's outcome
is not the expected one.
"""
import json
import sys

import jwt

data = json.load(open(sys.argv[1]))
keys = jwt.PyJWKSet.from_dict(data["jwks"])
wrong = 0
for case in data["cases"]:
    try:
        kid = jwt.get_unverified_header(case["token"]).get("kid")
        key = next(k for k in keys.keys if k.key_id == kid)
        claims = jwt.decode(
            case["token"],
            key.key,
            algorithms=["ES256"],
            audience=case["audience"],
            issuer=data["issuer"],
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
        outcome, detail = "accept", claims["sub"]
    except StopIteration:
        outcome, detail = "reject", "no published key with this kid"
    except jwt.PyJWTError as e:
        outcome, detail = "reject", type(e).__name__
    if outcome != case["expect"]:
        wrong += 1
    print(f"{'ok' if outcome == case['expect'] else 'WRONG'} {case['name']}: {outcome} ({detail})")
sys.exit(1 if wrong else 0)
