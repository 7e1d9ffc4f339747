/**
 * A Server-Sent Events parser, as the HTML standard's "event stream interpretation" describes it: lines end
 * in CRLF, LF or CR; `data:` lines are joined with LF; a blank line dispatches; lines starting with `:` are
 * comments; an `id` holding NUL is ignored. Fed text chunks as they arrive (a line may be split anywhere,
 * even between CR and LF).
 */

/** One dispatched event. `id` is the last event ID seen on the stream so far (it persists across events). */
export interface SseEvent {
  event: string;
  data: string;
  id: string;
}

export class SseParser {
  private buffer = "";
  /** The previous chunk ended in CR: a LF at the start of the next one belongs to it. */
  private pendingCr = false;
  private data: string[] = [];
  private eventType = "";
  private lastId = "";
  /** Last `retry:` value, in milliseconds. */
  retryMs: number | undefined;

  constructor(
    private readonly onEvent: (event: SseEvent) => void,
    /** Called for every line, comments included: lets a caller know the stream is alive. */
    private readonly onLine?: () => void,
  ) {}

  /** The last event ID seen (what `Last-Event-ID` should carry on a reconnect). */
  get lastEventId(): string {
    return this.lastId;
  }

  feed(chunk: string): void {
    if (this.pendingCr && chunk.startsWith("\n")) {
      chunk = chunk.slice(1);
    }
    this.pendingCr = false;
    let text = this.buffer + chunk;
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) {
        continue;
      }
      this.line(text.slice(start, i));
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) {
            i++;
          }
        } else {
          this.pendingCr = true;
        }
      }
      start = i + 1;
    }
    this.buffer = text.slice(start);
  }

  private line(line: string): void {
    this.onLine?.();
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) {
      return;
    }
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon >= 0) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) {
        value = value.slice(1);
      }
    }
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.eventType = value;
        break;
      case "id":
        if (!value.includes("\0")) {
          this.lastId = value;
        }
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) {
          this.retryMs = Number(value);
        }
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    if (this.data.length === 0) {
      this.eventType = "";
      return;
    }
    const event: SseEvent = {
      event: this.eventType || "message",
      data: this.data.join("\n"),
      id: this.lastId,
    };
    this.data = [];
    this.eventType = "";
    this.onEvent(event);
  }
}
