// The browser client, served by the function at GET /. Plain HTML and JavaScript, no build.
//
// Each connection attempt mints a fresh token (tokens expire after 10 minutes, and a
// reconnect may come much later), then opens the WebSocket. When the socket closes, the
// next attempt waits min(cap, base * 2^attempt) with full jitter; a successful open
// resets the attempt counter. The status line names the isolate the socket landed on, and
// each message the isolate that stored it. window.chat exposes the state (used by the
// browser test).

export const CLIENT_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>phloem realtime chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
  #log { list-style: none; padding: 0; min-height: 12rem; border: 1px solid #ccc; padding: .5rem; }
  #log li small { color: #777; }
  #status[data-state="open"] { color: green; }
  #status[data-state="closed"] { color: #b00; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  input[name="text"] { flex: 1; }
</style>
</head>
<body>
<h1>Realtime chat</h1>
<p>Status: <span id="status" data-state="connecting">connecting</span></p>
<ul id="log"></ul>
<form id="send"><input name="text" autocomplete="off" placeholder="Say something" required><button>Send</button></form>
<script type="module">
const BASE_MS = 500, CAP_MS = 15000;
const params = new URLSearchParams(location.search);
const name = params.get("name") || prompt("Your name?") || "guest";
const chat = window.chat = { status: "connecting", connects: 0, attempts: 0, isolates: [], messages: [], socket: null };
const statusEl = document.getElementById("status");
const log = document.getElementById("log");

function setStatus(state, text) {
  chat.status = state;
  statusEl.dataset.state = state;
  statusEl.textContent = text || state;
}

function show(m) {
  if (chat.messages.some((x) => x.id === m.id)) return;
  chat.messages.push(m);
  const li = document.createElement("li");
  const who = document.createElement("b");
  who.textContent = m.user + ": ";
  const when = document.createElement("small");
  when.textContent = " " + new Date(m.at).toLocaleTimeString() + " via " + m.isolate;
  li.append(who, document.createTextNode(m.body), when);
  log.append(li);
}

async function mintToken() {
  // DEMO ONLY: the function signs a token for whatever name it is given.
  const res = await fetch("token", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name }) });
  if (!res.ok) throw new Error("token: HTTP " + res.status);
  return (await res.json()).token;
}

function retryLater() {
  const delay = Math.random() * Math.min(CAP_MS, BASE_MS * 2 ** chat.attempts);
  chat.attempts++;
  setStatus("closed", "reconnecting in " + (delay / 1000).toFixed(1) + " s");
  setTimeout(connect, delay);
}

async function connect() {
  setStatus("connecting");
  let token;
  try {
    token = await mintToken();
  } catch (err) {
    return retryLater();
  }
  const url = new URL("ws?token=" + encodeURIComponent(token), location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  chat.socket = ws;
  ws.onopen = async () => {
    chat.attempts = 0;
    chat.connects++;
    setStatus("open");
    const res = await fetch("messages");  // what was said while we were away
    if (res.ok) (await res.json()).forEach(show);
  };
  ws.onmessage = (event) => {
    const m = JSON.parse(event.data);
    if (m.type === "hello") {
      chat.isolates.push(m.isolate);
      setStatus("open", "open, on isolate " + m.isolate);
    } else if (m.type === "message") {
      show(m);
    }
  };
  ws.onclose = (event) => {
    chat.lastClose = event.code;
    if (chat.socket === ws) retryLater();
  };
}

document.getElementById("send").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = event.target.elements.text;
  if (chat.socket && chat.socket.readyState === WebSocket.OPEN && input.value.trim()) {
    chat.socket.send(input.value);
    input.value = "";
  }
});

connect();
</script>
</body>
</html>
`;
