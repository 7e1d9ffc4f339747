// The client against a real kck and Postgres (see support.mjs): reads, writes, live keys, resume, access.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Kck, KckError } from "../dist/index.js";
import { cuttableProxy, env, eventually, sql, token } from "./support.mjs";

// This file owns users 1 to 10; the browser tests own 11 and up.
const kck = new Kck({ baseUrl: env.kckUrl, token: token({ sub: "1" }) });

/** Collects a subscription's changes, errors and states. */
function recorder() {
  const r = { changes: [], errors: [], states: [] };
  r.latest = (key) => r.changes.filter((c) => c.key === key).at(-1);
  r.options = (more = {}) => ({
    onError: (error, willRetry) => r.errors.push({ error, willRetry }),
    onStatus: (s) => r.states.push(s),
    minDelayMs: 20,
    maxDelayMs: 200,
    ...more,
  });
  r.onChange = (c) => r.changes.push(c);
  return r;
}

test("fetch, fetchMany, and update with waitFresh then fetch with minLsn", async () => {
  const entry = await kck.fetch("user/1");
  assert.deepEqual(entry.value, { id: 1, name: "user 1" });
  assert.match(entry.etag, /^".+"$/);
  assert.match(entry.lsn, /^[0-9A-F]+\/[0-9A-F]+$/);
  assert.ok(entry.computedAt);

  const many = await kck.fetchMany(["user/2", "nope/1"]);
  assert.deepEqual(many["user/2"].value, { id: 2, name: "user 2" });
  assert.ok(many["nope/1"] instanceof KckError);
  assert.equal(many["nope/1"].status, 400);
  assert.equal(many["nope/1"].code, "unknown_primer");

  const written = await kck.update("rename", { id: 3, name: "carol" }, { waitFresh: true, timeout: "20s" });
  assert.equal(written.fresh, true);
  assert.deepEqual(written.rows, [1]);
  assert.match(written.lsn, /^[0-9A-F]+\/[0-9A-F]+$/);
  const fresh = await kck.fetch("user/3", { minLsn: written.lsn, timeout: "20s" });
  assert.equal(fresh.value.name, "carol");

  await assert.rejects(kck.fetch("nope/1"), (e) => e instanceof KckError && e.code === "unknown_primer");
  await assert.rejects(kck.update("nope", {}), (e) => e instanceof KckError && e.status === 404);
});

test("subscribe: the current value first, then a change made in Postgres arrives", async () => {
  const r = recorder();
  const stop = kck.subscribe(["user/4", "user/5"], r.onChange, r.options());
  try {
    await eventually("the first values", () => r.latest("user/4") && r.latest("user/5"));
    assert.equal(r.latest("user/4").value.name, "user 4");
    assert.equal(r.latest("user/5").value.name, "user 5");
    assert.deepEqual(r.states.slice(0, 2), ["connecting", "open"]);

    await sql("UPDATE users SET name = 'dave' WHERE id = 4");
    const change = await eventually("user/4's change", () => r.latest("user/4")?.value.name === "dave" && r.latest("user/4"));
    assert.match(change.lsn, /^[0-9A-F]+\/[0-9A-F]+$/);
    // Only the key that changed was sent again.
    assert.equal(r.changes.filter((c) => c.key === "user/5").length, 1);
    assert.deepEqual(r.errors, []);
  } finally {
    stop();
  }
  assert.equal(r.states.at(-1), "closed");
});

test("resume: a dropped connection loses nothing written meanwhile", async () => {
  const proxy = await cuttableProxy(env.kckUrl);
  const client = new Kck({ baseUrl: proxy.url, token: token({ sub: "1" }) });
  const r = recorder();
  const stop = client.subscribe(["user/6", "user/7", "user/8"], r.onChange, r.options());
  try {
    await eventually("the first values", () => ["user/6", "user/7", "user/8"].every((k) => r.latest(k)));
    await sql("UPDATE users SET name = 'before' WHERE id = 6");
    await eventually("the change before the cut", () => r.latest("user/6").value.name === "before");

    // Cut the stream and keep kck out of reach while Postgres changes two of the keys, several times.
    proxy.block();
    proxy.drop();
    await eventually("the client noticing the cut", () => r.states.at(-1) === "reconnecting");
    for (let i = 1; i <= 5; i++) {
      await sql(`UPDATE users SET name = 'six ${i}' WHERE id = 6; UPDATE users SET name = 'seven ${i}' WHERE id = 7`);
    }
    // Let it fail to reconnect a few times (backoff), then let it through.
    const failed = r.errors.length;
    await eventually("failed reconnects", () => r.errors.length >= failed + 2);
    proxy.unblock();

    await eventually("the newest values after the reconnect", () =>
      r.latest("user/6").value.name === "six 5" && r.latest("user/7").value.name === "seven 5");
    assert.ok(r.errors.every((e) => e.willRetry), JSON.stringify(r.errors.map((e) => e.error.message)));
    // The reconnect said where it was, and the unchanged key was not delivered twice.
    const resumed = proxy.heads.filter((h) => /^last-event-id: [0-9A-F]+\/[0-9A-F]+$/im.test(h));
    assert.ok(resumed.length >= 1, proxy.heads.join("\n---\n"));
    assert.equal(r.changes.filter((c) => c.key === "user/8").length, 1);

    // And the resumed stream goes on.
    await sql("UPDATE users SET name = 'after' WHERE id = 8");
    await eventually("a change after the reconnect", () => r.latest("user/8").value.name === "after");
  } finally {
    stop();
    await proxy.close();
  }
});

test("a connection gone silent (no heartbeat) is given up after idleTimeoutMs and replaced", async () => {
  const proxy = await cuttableProxy(env.kckUrl);
  const client = new Kck({ baseUrl: proxy.url, token: token({ sub: "1" }) });
  const r = recorder();
  const stop = client.subscribe(["user/10"], r.onChange, r.options({ idleTimeoutMs: 1000 }));
  try {
    await eventually("the first value", () => r.latest("user/10"));
    // kck's stream goes on, but nothing reaches the client any more, and no error either.
    proxy.stall();
    const connections = proxy.heads.length;
    await sql("UPDATE users SET name = 'while silent' WHERE id = 10");
    await eventually("the idle timeout", () => r.errors.some((e) => e.error.code === "idle_timeout"));
    assert.equal(r.latest("user/10").value.name, "user 10");
    proxy.unstall();
    await eventually("the value, on a new connection", () => r.latest("user/10").value.name === "while silent");
    assert.ok(proxy.heads.length > connections);
    assert.ok(r.errors.every((e) => e.willRetry));
  } finally {
    stop();
    await proxy.close();
  }
});

test("access rules: a key the token may not read is a 403 that stops the subscription for good", async () => {
  // my_user/{id}: a token reads only its own (sub = id).
  const mine = recorder();
  const stopMine = kck.subscribe(["my_user/1"], mine.onChange, mine.options());
  const theirs = recorder();
  const stopTheirs = kck.subscribe(["my_user/2"], theirs.onChange, theirs.options());
  try {
    await eventually("my own key", () => mine.latest("my_user/1"));
    await eventually("the refusal", () => theirs.states.at(-1) === "closed");
    assert.equal(theirs.changes.length, 0);
    assert.equal(theirs.errors.length, 1);
    const { error, willRetry } = theirs.errors[0];
    assert.equal(willRetry, false);
    assert.ok(error instanceof KckError);
    assert.equal(error.status, 403);
    assert.equal(error.code, "forbidden");
    await assert.rejects(kck.fetch("my_user/2"), (e) => e.status === 403);

    // No token: 401, and with a fixed (absent) token retrying cannot help.
    const anonymous = recorder();
    new Kck({ baseUrl: env.kckUrl }).subscribe(["user/1"], anonymous.onChange, anonymous.options());
    await eventually("the 401", () => anonymous.states.at(-1) === "closed");
    assert.equal(anonymous.errors[0].error.status, 401);
    assert.equal(anonymous.errors[0].willRetry, false);
  } finally {
    stopMine();
    stopTheirs();
  }
});

test("a token function is asked again after a 401: an expired token is replaced and the stream opens", async () => {
  let asked = 0;
  const client = new Kck({
    baseUrl: env.kckUrl,
    // The first token expired an hour ago (beyond any leeway); the next ones are good.
    token: () => (++asked === 1 ? token({ sub: "1", exp: Math.floor(Date.now() / 1000) - 3600 }) : token({ sub: "1" })),
  });
  const r = recorder();
  const stop = client.subscribe(["user/9"], r.onChange, r.options());
  try {
    await eventually("the value with the renewed token", () => r.latest("user/9"));
    assert.equal(r.errors.length, 1);
    assert.equal(r.errors[0].error.status, 401);
    assert.equal(r.errors[0].willRetry, true);
    assert.ok(asked >= 2);
  } finally {
    stop();
  }
});
