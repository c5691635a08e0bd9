// A plain Workers-style module: the default export has fetch(request, env, ctx).
export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (request.method === "POST") {
      return new Response("echo " + (await request.text()));
    }
    return Response.json({
      path: url.pathname,
      branch: process.env.PHLOEM_BRANCH,
      hasDb: Boolean(process.env.DATABASE_URL),
      requestId: request.headers.get("x-request-id"),
    });
  },
};
