// The daemon connection: msgpack-rpc (docs/PROTOCOL.md) over the Unix socket, with no VS Code in sight.
//
// Owns socket-path resolution, framing, msgids, and routing of responses and `stream` notifications to the
// request they belong to. It knows no method semantics beyond `hello` on connect and `cancel`; the completion
// logic (completion.ts) builds on it, and tests drive it against a real daemon.

import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { DecodeError, decodeMultiStream, encode } from '@msgpack/msgpack';

export const PROTOCOL_VERSION = '1.0';

/** The socket, resolved as every ds4 client does (client/ds4c/protocol.py): explicit path, $DS4_SOCKET,
 * $XDG_RUNTIME_DIR/ds4/ds4.sock when that directory exists, /tmp/ds4-<uid>/ds4.sock. */
export function socketPath(explicit?: string, env: NodeJS.ProcessEnv = process.env): string {
  if (explicit) return explicit;
  if (env.DS4_SOCKET) return env.DS4_SOCKET;
  const runtime = env.XDG_RUNTIME_DIR;
  if (runtime && fs.statSync(runtime, { throwIfNoEntry: false })?.isDirectory()) {
    return path.join(runtime, 'ds4', 'ds4.sock');
  }
  return path.join('/tmp', `ds4-${os.userInfo().uid}`, 'ds4.sock');
}

/** An error response ({code, message}), or `disconnected` when the connection is gone. */
export class DaemonError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

export interface StreamEvent {
  id: number;
  kind: 'progress' | 'reasoning' | 'content' | 'tool_call';
  text?: string;
  tokens?: number[];
  done?: number;
  total?: number;
}

export interface Hello {
  protocol: string;
  daemon: string;
  backend: string;
  ctx: number;
  capabilities: string[];
  model: { name: string; path: string; quant: string; n_layer: number; demo: boolean; fingerprint: string };
}

export interface Usage {
  prompt_tokens: number;
  cached_tokens: number;
  completion_tokens: number;
}

export interface CompleteResult {
  text: string;
  finish_reason: 'stop' | 'length' | 'eos' | 'cancelled' | 'context_full';
  usage: Usage;
}

interface Pending {
  resolve(result: any): void;
  reject(error: DaemonError): void;
  onEvent?: (event: StreamEvent) => void;
}

export class Client {
  /** What `hello` answered: daemon version, model, backend. */
  hello!: Hello;
  closed = false;
  private nextId = 0;
  private readonly pending = new Map<number, Pending>();
  private readonly closeListeners: Array<(reason: string) => void> = [];

  private constructor(private readonly socket: net.Socket) {}

  /** Connect and say hello; rejects with DaemonError when the daemon is unreachable or speaks another major. */
  static async connect(socket: string, clientName = 'vscode'): Promise<Client> {
    const sock = net.createConnection(socket);
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', (e) => reject(new DaemonError('disconnected', `cannot connect to ${socket}: ${e.message}`)));
    });
    const client = new Client(sock);
    client.read();
    try {
      client.hello = await client.call<Hello>('hello', { protocol: PROTOCOL_VERSION, client: clientName });
    } catch (e) {
      client.close();
      throw e;
    }
    return client;
  }

  private async read(): Promise<void> {
    let reason = 'the daemon closed the connection';
    this.socket.on('error', (e) => (reason = e.message));
    try {
      for await (const msg of decodeMultiStream(this.socket)) this.dispatch(msg as any[]);
    } catch (e) {
      reason = e instanceof DecodeError ? `bad msgpack from the daemon: ${e.message}` : (e as Error).message;
    }
    this.fail(reason);
  }

  private dispatch(msg: any[]): void {
    if (msg[0] === 2 && msg[1] === 'stream') {
      const event = msg[2][0] as StreamEvent;
      this.pending.get(event.id)?.onEvent?.(event);
    } else if (msg[0] === 1) {
      const req = this.pending.get(msg[1]);
      this.pending.delete(msg[1]);
      if (msg[2]) req?.reject(new DaemonError(msg[2].code, msg[2].message));
      else req?.resolve(msg[3]);
    }
  }

  private fail(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    for (const req of this.pending.values()) req.reject(new DaemonError('disconnected', reason));
    this.pending.clear();
    for (const listener of this.closeListeners) listener(reason);
  }

  onClose(listener: (reason: string) => void): void {
    this.closeListeners.push(listener);
  }

  /** Send a request: its msgid (what `cancel` names) and the promise of its result. Optional fields left
   * undefined are not sent. */
  request<T>(method: string, params: object = {}, onEvent?: (event: StreamEvent) => void): { id: number; result: Promise<T> } {
    this.nextId = (this.nextId % 0xffffffff) + 1; // msgids are uint32
    const id = this.nextId;
    const result = new Promise<T>((resolve, reject) => {
      if (this.closed) return reject(new DaemonError('disconnected', 'the connection is closed'));
      this.pending.set(id, { resolve, reject, onEvent });
      this.socket.write(encode([0, id, method, [params]], { ignoreUndefined: true }));
    });
    return { id, result };
  }

  call<T>(method: string, params: object = {}): Promise<T> {
    return this.request<T>(method, params).result;
  }

  /** Stop a request in flight: generation answers with its result so far, finish_reason "cancelled". */
  cancel(id: number): void {
    if (this.pending.has(id)) this.call('cancel', { id }).catch(() => undefined); // gone already: nothing to stop
  }

  close(): void {
    this.fail('closed by the client');
  }
}
