// Verifies a Neon Auth JWT as with-realtime-chat does: the branch's JWKS, and its
// auth origin as the issuer. 200 {sub, email, iss} or 401 {error}; GET /env: its variables.
import { createRemoteJWKSet, jwtVerify } from "jose";

const jwks = createRemoteJWKSet(new URL(process.env.NEON_AUTH_JWKS_URL));
const issuer = new URL(process.env.NEON_AUTH_BASE_URL).origin;

export default {
  async fetch(request) {
    if (new URL(request.url).pathname === "/env") {
      return Response.json({ NEON_AUTH_BASE_URL: process.env.NEON_AUTH_BASE_URL,
                             NEON_AUTH_JWKS_URL: process.env.NEON_AUTH_JWKS_URL });
    }
    const token = (request.headers.get("authorization") ?? "").replace(/^Bearer /, "");
    try {
      const { payload } = await jwtVerify(token, jwks, { issuer });
      return Response.json({ sub: payload.sub, email: payload.email, iss: payload.iss });
    } catch (err) {
      return Response.json({ error: err.code ?? String(err) }, { status: 401 });
    }
  },
};
