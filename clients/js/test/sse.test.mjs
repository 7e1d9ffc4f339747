// The SSE parser alone (no kck needed): `node --test test/sse.test.mjs`.
import assert from "node:assert/strict";
import { test } from "node:test";

import { SseParser } from "../dist/sse.js";

function parse(chunks) {
  const events = [];
  let lines = 0;
  const parser = new SseParser((e) => events.push(e), () => lines++);
  for (const c of chunks) {
    parser.feed(c);
  }
  return { events, lines, parser };
}

const STREAM =
  ": keep-alive\r\n\r\n" +
  "event: value\r\nid: 0/16B3748\r\ndata: {\"key\":\"user/1\",\r\ndata: \"value\":1}\r\n\r\n" +
  "data:no space\n\n" +
  "event: value\rdata: cr only\r\r" +
  "id: bad\0id\ndata: keeps the old id\n\n" +
  "retry: 1500\nevent: empty\n\n" +
  "data: unterminated";

const EXPECTED = [
  { event: "value", id: "0/16B3748", data: "{\"key\":\"user/1\",\n\"value\":1}" },
  { event: "message", id: "0/16B3748", data: "no space" },
  { event: "value", id: "0/16B3748", data: "cr only" },
  { event: "message", id: "0/16B3748", data: "keeps the old id" },
];

test("events, comments, multi-line data, CRLF, LF and CR line ends, ids and retry", () => {
  const { events, parser } = parse([STREAM]);
  assert.deepEqual(events, EXPECTED);
  assert.equal(parser.lastEventId, "0/16B3748");
  assert.equal(parser.retryMs, 1500);
});

test("the same events however the stream is cut into chunks", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assert.deepEqual(parse([STREAM.slice(0, i), STREAM.slice(i)]).events, EXPECTED, `cut at ${i}`);
  }
  assert.deepEqual(parse([...STREAM]).events, EXPECTED, "one character at a time");
});
