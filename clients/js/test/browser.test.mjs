// The example pages in headless Chromium: each shows a live key's value, a write in Postgres changes the
// page, and the test reads the page's DOM. Skipped (said so) without Chromium.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { cuttableProxy, env, siteServer, sql, token, TIMEOUT_MS } from "./support.mjs";

const skip = env.chromium ? false : "Chromium is not installed (apt-get install -y chromium)";
let site, context, profile;

before(async () => {
  if (skip) {
    return;
  }
  // playwright-core only drives the browser over CDP; it downloads nothing.
  const { chromium } = await import("playwright-core");
  site = await siteServer(env.kckUrl);
  profile = await mkdtemp(path.join(tmpdir(), "kck-chromium-"));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: env.chromium,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: TIMEOUT_MS,
  });
});

after(async () => {
  await context?.close();
  await site?.close();
  if (profile) {
    await rm(profile, { recursive: true, force: true });
  }
});

/** Opens `page` and returns the Playwright page, failing the test on any page error. */
async function open(url) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(e.message));
  page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
  await page.goto(url, { timeout: TIMEOUT_MS });
  return { page, problems };
}

test("the React-free page shows a live key and follows a change made in Postgres", { skip }, async () => {
  const q = new URLSearchParams({ key: "user/11", token: token({ sub: "11" }) });
  const { page, problems } = await open(`${site.url}/examples/plain/index.html?${q}`);
  try {
    await page.waitForFunction(() => document.getElementById("value")?.textContent.includes('"user 11"'), null, { timeout: TIMEOUT_MS });
    assert.equal(await page.textContent("#status"), "open");
    await sql("UPDATE users SET name = 'changed in psql' WHERE id = 11");
    await page.waitForFunction(() => document.getElementById("value")?.textContent.includes("changed in psql"), null, { timeout: TIMEOUT_MS });
    const value = JSON.parse(await page.textContent("#value"));
    assert.deepEqual(value, { id: 11, name: "changed in psql" });
    assert.ok(Number(await page.getAttribute("#value", "data-updates")) >= 2);
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
  }
});

test("the React page (useKck) shows a live key, follows a change made in Postgres, and says when it is stale", { skip }, async () => {
  const q = new URLSearchParams({ id: "12", token: token({ sub: "12" }) });
  const { page, problems } = await open(`${site.url}/examples/react/index.html?${q}`);
  try {
    await page.waitForFunction(() => document.getElementById("name")?.textContent === "user 12", null, { timeout: TIMEOUT_MS });
    assert.equal(await page.getAttribute("#user", "data-stale"), "false");
    await sql("UPDATE users SET name = 'renamed in psql' WHERE id = 12");
    await page.waitForFunction(() => document.getElementById("name")?.textContent === "renamed in psql", null, { timeout: TIMEOUT_MS });
    assert.equal(await page.textContent("#user"), "User 12: renamed in psql");

    // kck out of reach: the value stays on screen, marked stale; a change made meanwhile shows once the
    // hook has reconnected.
    assert.deepEqual(problems, []);
    site.cut();
    await page.waitForFunction(() => document.getElementById("user")?.dataset.stale === "true", null, { timeout: TIMEOUT_MS });
    assert.equal(await page.textContent("#name"), "renamed in psql");
    await sql("UPDATE users SET name = 'changed while cut off' WHERE id = 12");
    site.restore();
    await page.waitForFunction(
      () => document.getElementById("name")?.textContent === "changed while cut off" && document.getElementById("user").dataset.stale === "false",
      null,
      { timeout: TIMEOUT_MS },
    );
    // The broken stream and the 503s while cut off are the browser's only complaints (no page error).
    assert.deepEqual(problems.filter((p) => !p.startsWith("Failed to load resource:")), []);
  } finally {
    await page.close();
  }
});

test("from another origin (CORS), the page resumes after its connection is cut, Last-Event-ID and all", { skip }, async () => {
  // The page comes from the site's origin; kck (through a proxy the test can cut) is another one.
  const proxy = await cuttableProxy(env.kckUrl);
  const q = new URLSearchParams({ key: "user/13", kck: proxy.url, token: token({ sub: "13" }) });
  const { page, problems } = await open(`${site.url}/examples/plain/index.html?${q}`);
  try {
    await page.waitForFunction(() => document.getElementById("value")?.textContent.includes('"user 13"'), null, { timeout: TIMEOUT_MS });
    assert.deepEqual(problems, []);
    proxy.drop();
    await sql("UPDATE users SET name = 'changed across origins' WHERE id = 13");
    await page.waitForFunction(() => document.getElementById("value")?.textContent.includes("changed across origins"), null, { timeout: TIMEOUT_MS });
    // The reconnect carried Last-Event-ID: its preflight asked for it, and kck allowed it (else the value
    // above could not have arrived).
    const preflights = proxy.heads.filter((h) => h.startsWith("OPTIONS /subscribe") && /^access-control-request-headers:.*last-event-id/im.test(h));
    assert.ok(preflights.length >= 1, proxy.heads.join("\n---\n"));
    assert.equal(await page.textContent("#status"), "open");
  } finally {
    await page.close();
    await proxy.close();
  }
});
