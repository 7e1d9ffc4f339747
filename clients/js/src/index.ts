/**
 * The kck client: read cached keys, run updaters, and subscribe to live keys over Server-Sent Events.
 *
 * No dependencies: it uses the platform's `fetch` (browsers, Node 20+). Subscriptions are read with
 * `fetch` streaming and a small SSE parser rather than `EventSource`, so that they can send an
 * `Authorization` header and `Last-Event-ID`, reconnect with exponential backoff and jitter, and stop when
 * the server says a request can never succeed (a 403, an unknown key).
 */

import { SseParser, type SseEvent } from "./sse.js";

export { SseParser, type SseEvent } from "./sse.js";

/** A token, or a function giving one (called before every request, so a renewed token is picked up). */
export type TokenSource =
  | string
  | (() => string | undefined | null | Promise<string | undefined | null>);

export interface KckOptions {
  /** Where kck serves, e.g. `https://kck.example.com`; empty (the default) means this page's origin. */
  baseUrl?: string;
  /** A JWT sent as `Authorization: Bearer ...` when kck's authentication is on. */
  token?: TokenSource;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof globalThis.fetch;
  /** Headers sent with every request. */
  headers?: Record<string, string>;
}

/** A cached value and what kck says about it. */
export interface Entry<T = unknown> {
  key: string;
  value: T;
  /** A hash of the stored bytes, with its double quotes, as in the `ETag` header. */
  etag: string;
  /** The WAL position the value reflects, e.g. `0/16B3748`. */
  lsn: string;
  /** When it was computed (RFC 3339). */
  computedAt: string;
  /** `hit`, `miss` or `stale`, as kck answered it. */
  cache?: string;
  /** Served while being recomputed (an expired or invalidated entry within `stale_while_revalidate`). */
  stale: boolean;
}

/** One `value` event of a subscription. */
export interface Change<T = unknown> {
  key: string;
  value: T;
  etag: string;
  lsn: string;
  computedAt: string;
}

export interface FetchOptions {
  /** Wait until the value reflects every commit up to this LSN (read your writes). */
  minLsn?: string;
  /** How long kck may wait for `minLsn` (`"2s"`, `"500ms"`). */
  timeout?: string;
  signal?: AbortSignal;
}

export interface UpdateOptions {
  /** Answer only once every cached value reflects the write (`?wait=fresh`). */
  waitFresh?: boolean;
  /** How long kck may wait for freshness (`"5s"`). */
  timeout?: string;
  signal?: AbortSignal;
}

export interface UpdateResult {
  /** A WAL position at or after the commit: pass it as `minLsn`. */
  lsn: string;
  /** The rows each statement affected. */
  rows: number[];
  /** With `waitFresh`: whether the cache reflected the write before the timeout (`false`: committed, do not retry). */
  fresh?: boolean;
  /** With `waitFresh` and `fresh: false`: how far behind kck was. */
  notFresh?: Record<string, unknown>;
}

export type SubscriptionStatus = "connecting" | "open" | "reconnecting" | "closed";

export interface SubscribeOptions {
  /**
   * Called on every failure. `willRetry` is false when the subscription has stopped for good (a 400, 403,
   * 404, or a 401 with a fixed token): its keys can never be read with these credentials.
   */
  onError?: (error: Error, willRetry: boolean) => void;
  /** Called when the connection's state changes. */
  onStatus?: (status: SubscriptionStatus) => void;
  /** Every event that is not a `value` event (for example a server's `resync`), as parsed. */
  onEvent?: (event: SseEvent) => void;
  /** First reconnect delay (default 250 ms); doubles on each failure, with jitter. */
  minDelayMs?: number;
  /** Longest reconnect delay (default 30 s). */
  maxDelayMs?: number;
  /** Reconnect when nothing (not even a heartbeat, sent every 15 s) arrived for this long (default 45 s). */
  idleTimeoutMs?: number;
  /**
   * Skip events whose ETag equals the last one delivered for their key (default true): after a reconnect
   * kck sends every key's current value again, and unchanged ones are not repeated to `onChange`.
   */
  dedupe?: boolean;
  /** Aborting it unsubscribes. */
  signal?: AbortSignal;
}

/** Stops a subscription (idempotent). */
export type Unsubscribe = () => void;

/** An error answer of kck (`{"error": {"code", "message", ...}}`), or a failure to reach it. */
export class KckError extends Error {
  /** The HTTP status (0 when kck could not be reached or the stream broke). */
  readonly status: number;
  /** kck's error code, e.g. `forbidden`, `not_cached`, `not_fresh`. */
  readonly code: string;
  /** The other fields of kck's error object. */
  readonly details: Record<string, unknown>;
  /** `Retry-After`, in seconds, when kck sent one. */
  readonly retryAfter?: number;

  constructor(
    status: number,
    code: string,
    message: string,
    details: Record<string, unknown> = {},
    retryAfter?: number,
  ) {
    super(message);
    this.name = "KckError";
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

/** Statuses after which retrying the same request cannot help. */
const FATAL = new Set([400, 403, 404, 405, 413, 414, 415]);

/** Percent-encodes what may not appear in a URL path, keeping `/` and the key's own `%XX` escapes. */
function keyPath(key: string): string {
  return key.replace(/[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]/g, (c) => encodeURIComponent(c));
}

function toChange<T>(data: string): Change<T> {
  const raw = JSON.parse(data) as {
    key: string;
    value: T;
    etag: string;
    lsn: string;
    computed_at: string;
  };
  return {
    key: raw.key,
    value: raw.value,
    etag: raw.etag,
    lsn: raw.lsn,
    computedAt: raw.computed_at,
  };
}

async function errorOf(response: Response): Promise<KckError> {
  const text = await response.text().catch(() => "");
  const retry = Number(response.headers.get("retry-after"));
  const retryAfter = Number.isFinite(retry) && retry > 0 ? retry : undefined;
  try {
    const body = JSON.parse(text) as { error?: Record<string, unknown> };
    if (body.error && typeof body.error.code === "string") {
      const { code, message, ...details } = body.error;
      return new KckError(
        response.status,
        code as string,
        typeof message === "string" ? message : String(code),
        details,
        retryAfter,
      );
    }
  } catch {
    // Not JSON: a proxy's answer, say.
  }
  return new KckError(
    response.status,
    "http_" + response.status,
    `kck answered ${response.status}${text ? ": " + text.slice(0, 200) : ""}`,
    {},
    retryAfter,
  );
}

export class Kck {
  readonly baseUrl: string;
  private readonly token: TokenSource | undefined;
  private readonly fetchImpl: typeof globalThis.fetch;
  private readonly headers: Record<string, string>;

  constructor(options: KckOptions = {}) {
    this.baseUrl = (options.baseUrl ?? "").replace(/\/+$/, "");
    this.token = options.token;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") {
      throw new Error("kck client: no fetch() here; pass options.fetch (Node 20+ and browsers have one)");
    }
    // Called unbound, as browsers refuse `fetch` called on another object.
    this.fetchImpl = (input, init) => f(input, init);
    this.headers = { ...(options.headers ?? {}) };
  }

  private async requestHeaders(extra: Record<string, string> = {}): Promise<Record<string, string>> {
    const headers: Record<string, string> = { ...this.headers, ...extra };
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (token) {
      headers["authorization"] = `Bearer ${token}`;
    }
    return headers;
  }

  private url(path: string, query: Record<string, string | undefined> = {}): string {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query)) {
      if (value !== undefined) {
        params.set(name, value);
      }
    }
    const q = params.toString();
    return `${this.baseUrl}${path}${q ? "?" + q : ""}`;
  }

  /** `GET /fetch/{key}`: the cached value (computed on a miss when kck primes on misses). */
  async fetch<T = unknown>(key: string, options: FetchOptions = {}): Promise<Entry<T>> {
    const response = await this.fetchImpl(
      this.url(`/fetch/${keyPath(key)}`, { min_lsn: options.minLsn, timeout: options.timeout }),
      { headers: await this.requestHeaders(), signal: options.signal },
    );
    if (!response.ok) {
      throw await errorOf(response);
    }
    const h = response.headers;
    return {
      key,
      value: JSON.parse(await response.text()) as T,
      etag: h.get("etag") ?? "",
      lsn: h.get("kck-lsn") ?? "",
      computedAt: h.get("kck-computed-at") ?? "",
      cache: h.get("kck-cache") ?? undefined,
      stale: h.get("kck-stale") === "true",
    };
  }

  /**
   * `POST /fetch`: many keys in one round trip. Each key (as kck writes it) maps to its entry or to the
   * error for that key alone (access rules apply per key).
   */
  async fetchMany<T = unknown>(
    keys: string[],
    options: FetchOptions = {},
  ): Promise<Record<string, Entry<T> | KckError>> {
    const response = await this.fetchImpl(
      this.url("/fetch", { min_lsn: options.minLsn, timeout: options.timeout }),
      {
        method: "POST",
        headers: await this.requestHeaders({ "content-type": "application/json" }),
        body: JSON.stringify({ keys }),
        signal: options.signal,
      },
    );
    if (!response.ok) {
      throw await errorOf(response);
    }
    const body = (await response.json()) as {
      results: Record<
        string,
        {
          status: number;
          value?: T;
          lsn?: string;
          etag?: string;
          computed_at?: string;
          cache?: string;
          error?: { code: string; message: string; [more: string]: unknown };
        }
      >;
    };
    const out: Record<string, Entry<T> | KckError> = {};
    for (const [key, r] of Object.entries(body.results)) {
      if (r.status === 200) {
        out[key] = {
          key,
          value: r.value as T,
          etag: r.etag ?? "",
          lsn: r.lsn ?? "",
          computedAt: r.computed_at ?? "",
          cache: r.cache,
          stale: r.cache === "stale",
        };
      } else {
        const { code = "error", message = "", ...details } = r.error ?? {};
        out[key] = new KckError(r.status, code, message, details);
      }
    }
    return out;
  }

  /**
   * `POST /update/{name}`: runs an updater. Resolves with the commit's LSN (and, with `waitFresh`, whether
   * the cache reflected it in time; `fresh: false` means committed but not yet reflected: do not retry).
   */
  async update(
    name: string,
    params: Record<string, unknown>,
    options: UpdateOptions = {},
  ): Promise<UpdateResult> {
    const response = await this.fetchImpl(
      this.url(`/update/${encodeURIComponent(name)}`, {
        wait: options.waitFresh ? "fresh" : undefined,
        timeout: options.timeout,
      }),
      {
        method: "POST",
        headers: await this.requestHeaders({ "content-type": "application/json" }),
        body: JSON.stringify(params),
        signal: options.signal,
      },
    );
    if (!response.ok) {
      throw await errorOf(response);
    }
    const body = (await response.json()) as {
      lsn: string;
      rows: number[];
      fresh?: boolean;
      not_fresh?: Record<string, unknown>;
    };
    return { lsn: body.lsn, rows: body.rows, fresh: body.fresh, notFresh: body.not_fresh };
  }

  /**
   * Live keys: `onChange` gets each key's current value first, then every new value as kck stores it.
   * Reconnects by itself (exponential backoff with jitter, `Last-Event-ID`); after a reconnect kck sends
   * every key's current value again, so nothing that changed meanwhile is missed. Returns the function that
   * stops it.
   */
  subscribe<T = unknown>(
    keys: string[],
    onChange: (change: Change<T>) => void,
    options: SubscribeOptions = {},
  ): Unsubscribe {
    const minDelay = options.minDelayMs ?? 250;
    const maxDelay = options.maxDelayMs ?? 30_000;
    const idleTimeout = options.idleTimeoutMs ?? 45_000;
    const dedupe = options.dedupe ?? true;
    const delivered = new Map<string, string>();
    let closed = false;
    let controller: AbortController | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let failures = 0;
    let lastEventId = "";
    let status: SubscriptionStatus | undefined;

    const setStatus = (s: SubscriptionStatus) => {
      if (s !== status) {
        status = s;
        options.onStatus?.(s);
      }
    };
    const report = (error: Error, willRetry: boolean) => {
      try {
        options.onError?.(error, willRetry);
      } catch {
        // A callback's failure must not stop the subscription.
      }
    };

    const stop = () => {
      if (closed) {
        return;
      }
      closed = true;
      clearTimeout(timer);
      controller?.abort();
      options.signal?.removeEventListener("abort", stop);
      setStatus("closed");
    };

    const retryLater = (error: Error, retryAfterS?: number) => {
      if (closed) {
        return;
      }
      report(error, true);
      setStatus("reconnecting");
      const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(failures, 30));
      failures++;
      // Equal jitter: half the ceiling, plus up to the other half at random.
      let delay = ceiling / 2 + Math.random() * (ceiling / 2);
      if (retryAfterS !== undefined) {
        delay = Math.max(delay, retryAfterS * 1000);
      }
      timer = setTimeout(connect, delay);
    };

    const connect = async () => {
      if (closed) {
        return;
      }
      setStatus(failures === 0 && lastEventId === "" ? "connecting" : "reconnecting");
      const abort = new AbortController();
      controller = abort;
      let idle: ReturnType<typeof setTimeout> | undefined;
      let timedOut = false;
      const alive = () => {
        clearTimeout(idle);
        idle = setTimeout(() => {
          timedOut = true;
          abort.abort();
        }, idleTimeout);
      };
      try {
        const extra: Record<string, string> = {
          "content-type": "application/json",
          accept: "text/event-stream",
        };
        if (lastEventId) {
          extra["last-event-id"] = lastEventId;
        }
        alive();
        const response = await this.fetchImpl(this.url("/subscribe"), {
          method: "POST",
          headers: await this.requestHeaders(extra),
          body: JSON.stringify({ keys }),
          signal: abort.signal,
          cache: "no-store",
        });
        if (!response.ok) {
          clearTimeout(idle);
          const error = await errorOf(response);
          const renewable = response.status === 401 && typeof this.token === "function";
          if (FATAL.has(response.status) || (response.status === 401 && !renewable)) {
            report(error, false);
            stop();
            return;
          }
          retryLater(error, error.retryAfter);
          return;
        }
        if (!response.body) {
          throw new Error("kck client: this fetch() gives no response stream");
        }
        setStatus("open");
        let serverError: KckError | undefined;
        const parser = new SseParser((event) => {
          if (event.id) {
            lastEventId = event.id;
          }
          if (event.event === "value") {
            // A stream that delivers values is healthy: the next failure starts the backoff afresh.
            failures = 0;
            const change = toChange<T>(event.data);
            if (dedupe && delivered.get(change.key) === change.etag) {
              return;
            }
            delivered.set(change.key, change.etag);
            try {
              onChange(change);
            } catch (e) {
              // The application's bug: said, and the stream goes on.
              report(e instanceof Error ? e : new Error(String(e)), true);
            }
          } else if (event.event === "error") {
            try {
              const e = (JSON.parse(event.data) as { error: { code: string; message: string } }).error;
              serverError = new KckError(0, e.code, e.message);
            } catch {
              serverError = new KckError(0, "stream_error", event.data);
            }
          } else {
            options.onEvent?.(event);
          }
        }, alive);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) {
            break;
          }
          alive();
          parser.feed(decoder.decode(value, { stream: true }));
          if (closed) {
            await reader.cancel().catch(() => {});
            return;
          }
        }
        clearTimeout(idle);
        retryLater(serverError ?? new KckError(0, "stream_ended", "kck ended the stream"));
      } catch (e) {
        clearTimeout(idle);
        if (closed) {
          return;
        }
        const error = timedOut
          ? new KckError(0, "idle_timeout", `nothing arrived for ${idleTimeout} ms`)
          : new KckError(0, "network", e instanceof Error ? e.message : String(e));
        retryLater(error);
      }
    };

    if (options.signal?.aborted) {
      closed = true;
      return () => {};
    }
    options.signal?.addEventListener("abort", stop);
    void connect();
    return stop;
  }
}
