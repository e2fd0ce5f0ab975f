// The inline-completion logic, free of the `vscode` module so Node's test runner can drive it against a real
// daemon: what to send (prefix, suffix, context chunks from recently edited documents), when (debounced), how
// to stop it (a cancellation token wired to `cancel`), and what the status bar shows (connection, model,
// tokens/s). extension.ts only translates between VS Code's types and these.

import { Client, CompleteResult, DaemonError, socketPath } from './protocol';

export interface Settings {
  enable: boolean;
  socketPath: string;
  maxTokens: number;
  debounceMs: number;
}

/** The part of VS Code's CancellationToken this logic uses. */
export interface Cancellation {
  readonly isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

export interface Chunk {
  path: string;
  text: string;
}

export interface Status {
  connected: boolean;
  model?: string;
  demo?: boolean;
  tokensPerSecond?: number;
  detail?: string; // why it is offline, or the last error
}

const PREFIX_LINES = 2000;
const SUFFIX_LINES = 200;
const CONTEXT_DOCUMENTS = 3;
const CONTEXT_LINES = 80;
const RETRY_MS = 5000; // with no daemon running, typing must not try a connect per keystroke

/** The prefix and suffix around `offset`, in whole lines. The prefix starts on a multiple of PREFIX_LINES / 4,
 * so it stays put while the cursor moves and the daemon's prompt cache keeps serving it. */
export function splitAt(text: string, offset: number): { prefix: string; suffix: string } {
  const before = text.slice(0, offset).split('\n');
  const step = PREFIX_LINES / 4;
  const first = Math.max(0, Math.ceil((before.length - 1 - PREFIX_LINES) / step) * step);
  const after = text.slice(offset).split('\n', SUFFIX_LINES + 1);
  return { prefix: before.slice(first).join('\n'), suffix: after.join('\n') };
}

/** The documents edited last, and where: their text around that line becomes context chunks. */
export class RecentEdits {
  private edits: Array<{ path: string; line: number }> = [];

  touch(path: string, line: number): void {
    this.edits = [{ path, line }, ...this.edits.filter((e) => e.path !== path)].slice(0, 12);
  }

  /** Chunks of up to CONTEXT_DOCUMENTS other documents, least recently edited first (the daemon wants the most
   * stable first); `read` gives a document's text, or undefined once it is closed. */
  chunks(current: string, read: (path: string) => string | undefined): Chunk[] {
    const out: Chunk[] = [];
    for (const { path, line } of this.edits) {
      if (out.length >= CONTEXT_DOCUMENTS) break;
      const text = path === current ? undefined : read(path);
      if (text === undefined) continue;
      const first = Math.max(0, line - CONTEXT_LINES / 2);
      const chunk = text.split('\n').slice(first, first + CONTEXT_LINES).join('\n');
      if (chunk.trim()) out.unshift({ path, text: chunk });
    }
    return out;
  }
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

export class Completer {
  readonly recent = new RecentEdits();
  status: Status = { connected: false };
  private client?: Client;
  private connecting?: Promise<Client | undefined>;
  private retryAt = 0;
  private readonly listeners: Array<(status: Status) => void> = [];

  constructor(
    private readonly settings: () => Settings,
    private readonly connect: (socket: string, name: string) => Promise<Client> = Client.connect,
  ) {}

  onStatus(listener: (status: Status) => void): void {
    this.listeners.push(listener);
  }

  private update(change: Partial<Status>): void {
    this.status = { ...this.status, ...change };
    for (const listener of this.listeners) listener(this.status);
  }

  /** The connection: opened on first use and again after a failure, at most every RETRY_MS. */
  private daemon(): Promise<Client | undefined> {
    if (this.client && !this.client.closed) return Promise.resolve(this.client);
    if (this.connecting) return this.connecting;
    if (Date.now() < this.retryAt) return Promise.resolve(undefined);
    this.retryAt = Date.now() + RETRY_MS;
    this.connecting = this.connect(socketPath(this.settings().socketPath), 'vscode')
      .then(
        (client) => {
          this.client = client;
          client.onClose((reason) => this.update({ connected: false, detail: reason }));
          const { name, demo } = client.hello.model;
          this.update({ connected: true, model: name, demo, detail: undefined });
          return client;
        },
        (e: Error) => {
          this.update({ connected: false, detail: e.message });
          return undefined;
        },
      )
      .finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  /** The completion at a cursor, or undefined when there is none to show: disabled, cancelled (by the token or
   * superseded by a newer request), empty, or no daemon. */
  async complete(req: { prefix: string; suffix: string; context: Chunk[] }, token: Cancellation): Promise<string | undefined> {
    const settings = this.settings();
    if (!settings.enable) return undefined;
    // VS Code asks at every keystroke and cancels the previous ask: only a pause in typing reaches the daemon.
    await sleep(settings.debounceMs);
    const client = token.isCancellationRequested ? undefined : await this.daemon();
    if (!client || token.isCancellationRequested) return undefined;
    let firstPiece = 0;
    const { id, result } = client.request<CompleteResult>(
      'complete',
      { ...req, max_tokens: settings.maxTokens },
      (event) => {
        if (event.kind === 'content' && !firstPiece) firstPiece = performance.now();
      },
    );
    const wired = token.onCancellationRequested(() => client.cancel(id));
    try {
      const r = await result;
      const n = r.usage.completion_tokens;
      if (firstPiece && n > 1) {
        // Decode speed: the tokens after the first, over the time since the first arrived.
        this.update({ tokensPerSecond: ((n - 1) * 1000) / (performance.now() - firstPiece) });
      }
      return r.finish_reason === 'cancelled' || r.text === '' ? undefined : r.text;
    } catch (e) {
      if (e instanceof DaemonError && e.code !== 'disconnected') this.update({ detail: `${e.code}: ${e.message}` });
      return undefined;
    } finally {
      wired.dispose();
    }
  }

  /** Drop the connection (the socket setting changed); the next completion connects again. */
  reset(): void {
    this.client?.close();
    this.client = undefined;
    this.retryAt = 0;
  }

  dispose(): void {
    this.client?.close();
  }
}
