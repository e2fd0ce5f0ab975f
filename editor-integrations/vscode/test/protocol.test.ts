// The protocol client against a real daemon on $DS4_SOCKET (tests/test_editors.py starts one and runs
// `node --test out/test/`).

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { Client, CompleteResult, DaemonError, socketPath, StreamEvent } from '../src/protocol';

const SOCKET = process.env.DS4_SOCKET ?? '';

test('socket path resolution mirrors client/ds4c/protocol.py', () => {
  const runtime = fs.mkdtempSync(path.join(os.tmpdir(), 'ds4-rt-'));
  assert.equal(socketPath('/x/explicit.sock', { DS4_SOCKET: '/x/env.sock' }), '/x/explicit.sock');
  assert.equal(socketPath('', { DS4_SOCKET: '/x/env.sock', XDG_RUNTIME_DIR: runtime }), '/x/env.sock');
  assert.equal(socketPath(undefined, { XDG_RUNTIME_DIR: runtime }), path.join(runtime, 'ds4', 'ds4.sock'));
  const fallback = `/tmp/ds4-${os.userInfo().uid}/ds4.sock`;
  assert.equal(socketPath(undefined, { XDG_RUNTIME_DIR: path.join(runtime, 'missing') }), fallback);
  assert.equal(socketPath(undefined, {}), fallback);
  fs.rmSync(runtime, { recursive: true });
});

test('hello on connect; error responses are DaemonErrors', async () => {
  const client = await Client.connect(SOCKET, 'node-test');
  assert.equal(client.hello.protocol, '1.0');
  assert.equal(client.hello.model.quant, 'q2');
  assert.ok(client.hello.capabilities.includes('cancel'));
  await assert.rejects(client.call('complete', { prefix: 'x', max_tokens: 'many' }), (e: DaemonError) => {
    assert.equal(e.code, 'bad_request');
    assert.match(e.message, /^max_tokens:/);
    return true;
  });
  // Optional fields left undefined are not sent (the daemon rejects unknown or mistyped ones).
  const r = await client.call<CompleteResult>('complete', { prefix: 'x = ', suffix: undefined, max_tokens: 2 });
  assert.equal(r.usage.completion_tokens, 2);
  client.close();
});

test('no daemon: connect rejects with "disconnected"', async () => {
  await assert.rejects(Client.connect(path.join(os.tmpdir(), 'no-such-ds4.sock')), { code: 'disconnected' });
});

test('streamed pieces add up to the result; pipelined requests are answered by id', async () => {
  const client = await Client.connect(SOCKET, 'node-test');
  const events: StreamEvent[] = [];
  const a = client.request<CompleteResult>('complete', { prefix: 'def f(x):\n    ', max_tokens: 8, session: 'a' },
    (e) => events.push(e));
  const b = client.request<CompleteResult>('complete', { prefix: 'int main() {', max_tokens: 3, session: 'b' });
  const [ra, rb] = await Promise.all([a.result, b.result]);
  assert.equal(events[0].kind, 'progress');
  assert.equal(events.filter((e) => e.kind === 'content').map((e) => e.text).join(''), ra.text);
  assert.equal(ra.usage.completion_tokens, 8);
  assert.equal(rb.usage.completion_tokens, 3);
  client.close();
});

test('cancel stops a request in flight; a closed connection rejects what is pending', async () => {
  const client = await Client.connect(SOCKET, 'node-test');
  let pieces = 0;
  const { id, result } = client.request<CompleteResult>('complete', { prefix: 'x', max_tokens: 3000 }, (e) => {
    if (e.kind === 'content' && ++pieces === 1) client.cancel(id);
  });
  const r = await result;
  assert.equal(r.finish_reason, 'cancelled');
  assert.ok(r.usage.completion_tokens < 3000);
  const pending = client.call('complete', { prefix: 'y', max_tokens: 3000 });
  client.close();
  await assert.rejects(pending, { code: 'disconnected' });
});
