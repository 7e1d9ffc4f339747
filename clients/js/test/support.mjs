// Shared by the node tests. They run against a real kck and Postgres that `tests/js.rs` (cargo test)
// starts, and find them through the environment:
//   KCK_URL         kck's base URL (authentication on, HS256)
//   KCK_JWT_SECRET  the HS256 secret kck checks tokens with
//   PG_URL          the Postgres database kck follows (tables users(id, name))
//   PSQL            the psql binary the tests write to Postgres with
//   CHROMIUM        headless Chromium for the browser tests (empty: those tests are skipped)
import { createHmac } from "node:crypto";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const env = {
  kckUrl: need("KCK_URL"),
  secret: need("KCK_JWT_SECRET"),
  pgUrl: need("PG_URL"),
  psql: need("PSQL"),
  chromium: process.env.CHROMIUM ?? "",
};

function need(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through cargo (tests/js.rs), which starts kck`);
  }
  return value;
}

/** Generous: machines are noisy. Only an upper bound, never a timing assertion. */
export const TIMEOUT_MS = 30_000;

const b64 = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT with `claims` (exp one hour ahead unless given). */
export function token(claims = {}) {
  const body = { exp: Math.floor(Date.now() / 1000) + 3600, ...claims };
  const head = b64(JSON.stringify({ alg: "HS256", typ: "JWT" })) + "." + b64(JSON.stringify(body));
  return head + "." + createHmac("sha256", env.secret).update(head).digest("base64url");
}

/** Runs SQL in Postgres with psql, as a person would (not through kck). */
export function sql(text) {
  return new Promise((resolve, reject) => {
    execFile(
      env.psql,
      [env.pgUrl, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", text],
      { timeout: TIMEOUT_MS },
      (error, stdout, stderr) => (error ? reject(new Error(`psql: ${error.message}\n${stderr}`)) : resolve(stdout.trim())),
    );
  });
}

/** Resolves once `check()` is truthy (polled), with its value; rejects naming `what` after TIMEOUT_MS. */
export async function eventually(what, check, timeoutMs = TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * A TCP proxy in front of kck whose connections the test can cut (`drop()`), and which can refuse new
 * ones for a while (`block()` / `unblock()`), or keep them open but silent (`stall()` / `unstall()`). Remembers the head of every request it forwarded.
 */
export async function cuttableProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const heads = [];
  let blocked = false;
  let stalled = false;
  const server = net.createServer((client) => {
    if (blocked) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client);
    sockets.add(upstream);
    let head = "";
    client.on("data", (chunk) => {
      if (head.length < 4096) {
        head += chunk.toString("latin1");
        if (head.includes("\r\n\r\n")) {
          heads.push(head.slice(0, head.indexOf("\r\n\r\n")));
          head = "x".repeat(4096);
        }
      }
    });
    client.pipe(upstream);
    // While stalled, kck's bytes are swallowed: the connection stays open but silent (half-open).
    upstream.on("data", (chunk) => {
      if (!stalled) {
        client.write(chunk);
      }
    });
    const close = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", close).on("close", close);
    upstream.on("error", close).on("close", close);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    heads,
    block() {
      blocked = true;
    },
    unblock() {
      blocked = false;
    },
    stall() {
      stalled = true;
    },
    unstall() {
      stalled = false;
    },
    drop() {
      for (const s of sockets) {
        s.destroy();
      }
    },
    close: () => new Promise((r) => {
      for (const s of sockets) {
        s.destroy();
      }
      server.close(r);
    }),
  };
}

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".map": "application/json" };

/**
 * The example pages and the built client served from one origin with kck (every other path is passed to
 * kck, streams included), as a site would put them behind one proxy: no CORS needed.
 */
export async function siteServer(target) {
  const upstream = new URL(target);
  const live = new Set();
  let blocked = false;
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://x");
    if (url.pathname.startsWith("/examples/") || url.pathname.startsWith("/clients/js/dist/")) {
      const file = path.join(repo, path.normalize(decodeURIComponent(url.pathname)));
      if (!file.startsWith(repo + path.sep)) {
        res.writeHead(403).end();
        return;
      }
      try {
        const body = await readFile(file);
        res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" }).end(body);
      } catch {
        res.writeHead(404).end("not found");
      }
      return;
    }
    if (blocked) {
      res
        .writeHead(503, { "content-type": "application/json" })
        .end(JSON.stringify({ error: { code: "unavailable", message: "cut off by the test" } }));
      return;
    }
    live.add(res);
    res.on("close", () => live.delete(res));
    const forward = http.request(
      { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    forward.on("error", () => res.destroy());
    req.pipe(forward);
    res.on("close", () => forward.destroy());
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    /** Ends every answer kck is streaming, and answers 503 instead of kck until `restore()`. */
    cut() {
      blocked = true;
      for (const res of live) {
        res.destroy();
      }
    },
    restore() {
      blocked = false;
    },
    close: () => new Promise((r) => {
      server.closeAllConnections();
      server.close(r);
    }),
  };
}
