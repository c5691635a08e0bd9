// Declares @neondatabase/functions (not on the npm registry: phloem substitutes its own at
// install time) and imports @neon/functions without declaring it (substituted at bundle
// time). waitUntil work outlives the response; the attached "pool" is closed after drain.
import { attachDatabasePool, waitUntil as neonWaitUntil } from "@neon/functions";
import { waitUntil } from "@neondatabase/functions/v1";

attachDatabasePool({ end: async () => console.log("attached pool closed") });

let finished = 0;

export default {
  async fetch(request: Request): Promise<Response> {
    const url = new URL(request.url);
    if (url.pathname === "/later") {
      const ms = Number(url.searchParams.get("ms") ?? "300");
      const use = url.searchParams.get("via") === "neon" ? neonWaitUntil : waitUntil;
      use(new Promise<void>((resolve) => setTimeout(() => {
        finished += 1;
        console.log(`background work done (${finished})`);
        resolve();
      }, ms)));
      return new Response("accepted", { status: 202 });
    }
    return Response.json({ finished, pid: process.pid });
  },
};
