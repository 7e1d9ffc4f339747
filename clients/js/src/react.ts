/**
 * React bindings: `useKck(key)` keeps a component on a live key. React is a peer dependency of this entry
 * point only; the main entry point has no dependency at all.
 */

import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useState,
  type ReactElement,
  type ReactNode,
} from "react";

import { Kck, type SubscribeOptions } from "./index.js";

export { Kck, KckError } from "./index.js";

const KckContext = createContext<Kck | null>(null);

/** Makes `client` the one `useKck` uses below it. */
export function KckProvider(props: { client: Kck; children?: ReactNode }): ReactElement {
  return createElement(KckContext.Provider, { value: props.client }, props.children);
}

export interface KckState<T> {
  /** The key's newest value (undefined until the first one arrives). */
  value: T | undefined;
  /** No value yet, and still trying. */
  loading: boolean;
  /** The last failure (cleared by the next value or connection); a 403 or unknown key stops for good. */
  error: Error | undefined;
  /** A value is shown but the live connection is down: it may be out of date until it reconnects. */
  stale: boolean;
  /** The value's ETag and LSN. */
  etag?: string;
  lsn?: string;
}

export interface UseKckOptions extends Pick<SubscribeOptions, "minDelayMs" | "maxDelayMs" | "idleTimeoutMs"> {
  /** The client (default: the one of the nearest `KckProvider`). */
  client?: Kck;
}

const EMPTY = { value: undefined, loading: false, error: undefined, stale: false };

/** The live value of `key` (nothing is subscribed while `key` is null or undefined). */
export function useKck<T = unknown>(key: string | null | undefined, options: UseKckOptions = {}): KckState<T> {
  const fromContext = useContext(KckContext);
  const client = options.client ?? fromContext;
  if (!client) {
    throw new Error("useKck: no client; wrap the tree in <KckProvider client={new Kck(...)}> or pass { client }");
  }
  const [state, setState] = useState<KckState<T>>(key ? { ...EMPTY, loading: true } : EMPTY);
  const { minDelayMs, maxDelayMs, idleTimeoutMs } = options;
  useEffect(() => {
    if (!key) {
      setState(EMPTY);
      return;
    }
    setState({ ...EMPTY, loading: true });
    return client.subscribe<T>(
      [key],
      (change) =>
        setState({
          value: change.value,
          loading: false,
          error: undefined,
          stale: false,
          etag: change.etag,
          lsn: change.lsn,
        }),
      {
        minDelayMs,
        maxDelayMs,
        idleTimeoutMs,
        onError: (error, willRetry) =>
          setState((s) => ({
            ...s,
            error,
            loading: willRetry && s.value === undefined,
            stale: s.value !== undefined,
          })),
        onStatus: (status) => {
          if (status === "open") {
            setState((s) => ({ ...s, error: undefined, stale: false }));
          }
        },
      },
    );
  }, [client, key, minDelayMs, maxDelayMs, idleTimeoutMs]);
  return state;
}
