// Verifies the edge's assertions with `jose` (npm), as an Express origin would.
// Input (argv[2], JSON): {jwks, issuer, cases: [{name, token, audience, expect}]}, where
// expect is "accept" or "reject". Prints one line per case; exits 1 if any case's outcome
// is not the expected one.
import { readFileSync } from 'node:fs';
import { createLocalJWKSet, jwtVerify } from 'jose';

const input = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const keys = createLocalJWKSet(input.jwks);
let wrong = 0;
for (const c of input.cases) {
  let outcome;
  let detail = '';
  try {
    const { payload } = await jwtVerify(c.token, keys, {
      issuer: input.issuer, audience: c.audience, algorithms: ['ES256'],
    });
    outcome = 'accept';
    detail = payload.sub;
  } catch (e) {
    outcome = 'reject';
    detail = e.code || e.message;
  }
  if (outcome !== c.expect) wrong += 1;
  console.log(`${outcome === c.expect ? 'ok' : 'WRONG'} ${c.name}: ${outcome} (${detail})`);
}
process.exit(wrong ? 1 : 0);
