// The inline-completion logic against a real daemon on $DS4_SOCKET, with a stand-in for VS Code's
// cancellation token; the connection is wrapped to record what went over the wire.

import assert from 'node:assert/strict';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { Cancellation, Completer, RecentEdits, Settings, splitAt, Status } from '../src/completion';
import { Client, StreamEvent } from '../src/protocol';

const SOCKET = process.env.DS4_SOCKET ?? '';

class Token implements Cancellation {
  isCancellationRequested = false;
  private listeners: Array<() => void> = [];
  onCancellationRequested(listener: () => void) {
    this.listeners.push(listener);
    return { dispose: () => (this.listeners = this.listeners.filter((l) => l !== listener)) };
  }
  cancel() {
    this.isCancellationRequested = true;
    for (const l of this.listeners) l();
  }
}

interface Sent {
  id?: number;
  method: string;
  params: any;
  events: StreamEvent[];
  result?: any;
}

/** A Completer whose connection records every request, its stream and its answer. */
function recorded(settings: Partial<Settings>) {
  const sent: Sent[] = [];
  const connect = async (socket: string, name: string) => {
    const client = await Client.connect(socket, name);
    const request = client.request.bind(client);
    client.request = (<T>(method: string, params: any, onEvent?: (e: StreamEvent) => void) => {
      const s: Sent = { method, params, events: [] };
      sent.push(s);
      const r = request<T>(method, params, (e) => {
        s.events.push(e);
        onEvent?.(e);
      });
      s.id = r.id;
      r.result.then((v) => (s.result = v), () => undefined);
      return r;
    }) as Client['request'];
    return client;
  };
  const all: Settings = { enable: true, socketPath: SOCKET, maxTokens: 8, debounceMs: 10, ...settings };
  return { completer: new Completer(() => all, connect), sent, settings: all };
}

const until = async (cond: () => boolean) => {
  for (let i = 0; i < 6000 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(cond(), 'timed out');
};

test('splitAt: prefix and suffix around the cursor; a long prefix starts on a stable line', () => {
  assert.deepEqual(splitAt('ab\ncd\nef', 4), { prefix: 'ab\nc', suffix: 'd\nef' });
  const lines = Array.from({ length: 3000 }, (_, i) => `line ${i}`);
  const text = lines.join('\n');
  const at = (row: number) => splitAt(text, lines.slice(0, row).join('\n').length + 1);
  assert.ok(at(2600).prefix.startsWith('line 1000\n'));
  assert.ok(at(2700).prefix.startsWith('line 1000\n'), 'the prefix start moved with the cursor');
  assert.equal(at(2600).suffix.split('\n').length, 201);
});

test('RecentEdits: other documents around their last edit, least recent first', () => {
  const recent = new RecentEdits();
  const docs: Record<string, string> = {
    'a.py': Array.from({ length: 200 }, (_, i) => `a${i}`).join('\n'),
    'b.py': 'B = 2',
    'c.py': 'C = 3',
    'gone.py': 'x',
  };
  recent.touch('a.py', 150);
  recent.touch('gone.py', 0);
  recent.touch('b.py', 0);
  recent.touch('c.py', 0);
  const chunks = recent.chunks('c.py', (p) => (p === 'gone.py' ? undefined : docs[p]));
  assert.deepEqual(chunks.map((c) => c.path), ['a.py', 'b.py']);
  assert.equal(chunks[0].text.split('\n')[0], 'a110');
  assert.equal(chunks[0].text.split('\n').length, 80);
});

test('a completion with context; the status reports the model and tokens/s', async () => {
  const { completer, sent } = recorded({});
  const seen: Status[] = [];
  completer.onStatus((s) => seen.push(s));
  const context = [{ path: 'util.py', text: 'import os\n' }];
  const text = await completer.complete({ prefix: 'def add(a, b):\n    return ', suffix: '\n', context }, new Token());
  const [complete] = sent; // (hello went out before the recording began)
  assert.deepEqual(complete.params, { prefix: 'def add(a, b):\n    return ', suffix: '\n', context, max_tokens: 8 });
  assert.equal(text, complete.result.text);
  assert.ok(text);
  assert.equal(completer.status.connected, true);
  assert.match(completer.status.model!, /tiny q2/);
  assert.ok(completer.status.tokensPerSecond! > 0);
  assert.ok(seen.length >= 2);
  completer.dispose();
});

test("VS Code's cancellation token is wired to cancel; the daemon answers the request as cancelled", async () => {
  const { completer, sent } = recorded({ maxTokens: 3000 });
  const token = new Token();
  const pending = completer.complete({ prefix: 'int main() {', suffix: '', context: [] }, token);
  await until(() => sent.length === 1 && sent[0].events.some((e) => e.kind === 'content'));
  token.cancel();
  assert.equal(await pending, undefined);
  const cancel = sent.find((s) => s.method === 'cancel')!;
  assert.equal(cancel.params.id, sent[0].id);
  await until(() => cancel.result !== undefined);
  assert.deepEqual(cancel.result, { cancelled: true });
  assert.equal(sent[0].result.finish_reason, 'cancelled');
  completer.dispose();
});

test('a token cancelled while debouncing sends nothing; disabled sends nothing', async () => {
  const { completer, sent, settings } = recorded({ debounceMs: 50 });
  const token = new Token();
  const pending = completer.complete({ prefix: 'x', suffix: '', context: [] }, token);
  token.cancel();
  assert.equal(await pending, undefined);
  settings.enable = false;
  assert.equal(await completer.complete({ prefix: 'x', suffix: '', context: [] }, new Token()), undefined);
  assert.equal(sent.length, 0);
});

test('no daemon: offline status with the reason, no exception', async () => {
  const { completer } = recorded({ socketPath: path.join(os.tmpdir(), 'no-such-ds4.sock') });
  assert.equal(await completer.complete({ prefix: 'x', suffix: '', context: [] }, new Token()), undefined);
  assert.equal(completer.status.connected, false);
  assert.match(completer.status.detail!, /cannot connect/);
});
