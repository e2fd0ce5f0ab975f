-- Headless tests of the Neovim plugin against a real daemon on $DS4_SOCKET (tests/test_editors.py starts one):
--   nvim --headless -u NONE -i NONE --cmd 'set rtp^=editor-integrations/nvim' -c 'luafile .../tests/run.lua'
-- Prints one line per test and exits with the number of failures.

local api = vim.api
local rpc = require('ds4.rpc')
local ds4 = require('ds4')
local complete = require('ds4.complete')

-- Tests place the cursor where insert mode would have it: just past the end of a line.
vim.o.virtualedit = 'onemore'

local tests = {}
local function test(name, fn)
  table.insert(tests, { name = name, fn = fn })
end

local function wait(what, cond, ms)
  assert(vim.wait(ms or 30000, cond, 10), 'timed out waiting for ' .. what)
end

local function eq(want, got, what)
  assert(vim.deep_equal(want, got), ('%s: want %s, got %s'):format(what or 'value', vim.inspect(want),
    vim.inspect(got)))
end

-- Record every request the shared connection sends, with its params and its answer.
local sent = {}
local function record(client)
  if client.recorded then
    return client
  end
  client.recorded = true
  local request = client.request
  client.request = function(self, method, params, on_done, on_event)
    local r = { method = method, params = params, events = {} }
    table.insert(sent, r)
    r.id = request(self, method, params, function(err, result)
      r.err, r.result, r.done = err, result, true
      if on_done then
        on_done(err, result)
      end
    end, function(event)
      table.insert(r.events, event)
      if on_event then
        on_event(event)
      end
    end)
    return r.id
  end
  return client
end

local function last(method)
  for i = #sent, 1, -1 do
    if sent[i].method == method then
      return sent[i]
    end
  end
end

local function code_buffer(lines, row, col)
  local buf = api.nvim_create_buf(true, false)
  api.nvim_buf_set_name(buf, vim.fn.tempname() .. '.py')
  api.nvim_buf_set_lines(buf, 0, -1, false, lines)
  api.nvim_set_current_buf(buf)
  api.nvim_win_set_cursor(0, { row, col })
  return buf
end

-- --- the wire --------------------------------------------------------------------------------------------------

test('socket path resolution mirrors client/ds4c/protocol.py', function()
  local saved = { vim.env.DS4_SOCKET, vim.env.XDG_RUNTIME_DIR }
  eq('/x/explicit.sock', rpc.socket_path('/x/explicit.sock'))
  vim.env.DS4_SOCKET = '/x/env.sock'
  eq('/x/env.sock', rpc.socket_path(nil))
  vim.env.DS4_SOCKET = nil
  local runtime = vim.fn.tempname()
  vim.fn.mkdir(runtime, 'p')
  vim.env.XDG_RUNTIME_DIR = runtime
  eq(runtime .. '/ds4/ds4.sock', rpc.socket_path(nil))
  vim.env.XDG_RUNTIME_DIR = runtime .. '/missing'
  eq(('/tmp/ds4-%d/ds4.sock'):format((vim.uv or vim.loop).getuid()), rpc.socket_path(nil))
  vim.env.DS4_SOCKET, vim.env.XDG_RUNTIME_DIR = saved[1], saved[2]
end)

test('a message split across reads is decoded once, whole', function()
  local client = rpc.connect(rpc.socket_path(nil))
  local got = {}
  client.pending[77] = { on_done = function(err, result) table.insert(got, { err, result }) end }
  local bytes = vim.mpack.encode({ 1, 77, vim.NIL, { text = 'héllo', n = -5, list = { 1.5, true } } })
  for i = 1, #bytes do
    client:_feed(bytes:sub(i, i))
  end
  wait('the response', function() return #got == 1 end)
  eq(nil, got[1][1], 'error')
  eq('héllo', got[1][2].text)
  eq({ 1.5, true }, got[1][2].list)
  client:close()
end)

test('hello and an error response', function()
  local client = rpc.connect(rpc.socket_path(nil))
  local err, hello = client:call('hello', { protocol = '1.0', client = 'nvim-test' })
  eq(nil, err)
  eq('1.0', hello.protocol)
  eq('q2', hello.model.quant)
  err = client:call('complete', { prefix = 'x', max_tokens = 'many' })
  eq('bad_request', err.code)
  assert(err.message:match('^max_tokens:'), err.message)
  client:close()
end)

test('no daemon: requests fail with "disconnected", not an exception', function()
  local client = rpc.connect(vim.fn.tempname() .. '.sock')
  local err = client:call('hello', { protocol = '1.0' })
  eq('disconnected', err.code)
  assert(client.closed)
end)

-- --- completion ------------------------------------------------------------------------------------------------

test('a completion streams into ghost text, and accept inserts it', function()
  ds4.setup({ max_tokens = 8 })
  record(ds4.client())
  local buf = code_buffer({ 'def add(a, b):', '    return ', '', 'print(add(1, 2))' }, 2, 11)
  complete.request()
  local r = last('complete')
  eq('def add(a, b):\n    return ', r.params.prefix, 'prefix')
  eq('\n\nprint(add(1, 2))', r.params.suffix, 'suffix')
  wait('the completion', function() return r.done end)
  eq(nil, r.err)
  assert(r.result.text ~= '', 'empty completion')
  assert(#r.events > 1 and r.events[1].kind == 'progress', 'no stream')
  eq(r.result.text, complete.suggestion(), 'suggestion')
  local marks = api.nvim_buf_get_extmarks(buf, api.nvim_create_namespace('ds4'), 0, -1, { details = true })
  eq(1, #marks, 'extmarks')
  eq({ 1, 11 }, { marks[1][2], marks[1][3] }, 'extmark position')
  local first = vim.split(r.result.text, '\n', { plain = true })[1]
  eq((first:gsub('\t', '        ')), marks[1][4].virt_text[1][1], 'virtual text')
  complete.accept()
  eq(nil, complete.visible() or nil, 'visible after accept')
  local text = table.concat(api.nvim_buf_get_lines(buf, 0, -1, false), '\n')
  eq('def add(a, b):\n    return ' .. r.result.text .. '\n\nprint(add(1, 2))', text)
end)

test('a fresh edit cancels the request in flight; the daemon answers it as cancelled', function()
  ds4.setup({ max_tokens = 2000 })
  local buf = code_buffer({ 'int main() {' }, 1, 12)
  complete.request()
  local old = last('complete')
  wait('the first piece', function() return complete.visible() end)
  -- The user types: the plugin cancels at once, and the next request supersedes whatever is left.
  api.nvim_buf_set_text(buf, 0, 12, 0, 12, { '', '' })
  api.nvim_win_set_cursor(0, { 2, 0 })
  complete.on_cursor_moved()
  complete.on_text_changed()
  eq(false, complete.visible(), 'stale suggestion still visible')
  local cancel = last('cancel')
  eq(old.id, cancel.params.id, 'cancelled msgid')
  ds4.config.max_tokens = 4
  complete.request()
  local new = last('complete')
  wait('both answers', function() return old.done and new.done and cancel.done end)
  eq('cancelled', old.result.finish_reason, 'superseded request')
  assert(old.result.usage.completion_tokens < 2000)
  eq({ cancelled = true }, cancel.result, 'cancel result')
  assert(new.result.finish_reason == 'length' or new.result.finish_reason == 'eos', new.result.finish_reason)
end)

test('recently edited buffers ride along as context, least recent first', function()
  ds4.setup({ max_tokens = 2, context_buffers = 2 })
  local a = code_buffer({ 'A = 1' }, 1, 0)
  complete.note_edit(a)
  local b = code_buffer({ 'B = 2' }, 1, 0)
  complete.note_edit(b)
  local cur = code_buffer({ 'x = ' }, 1, 4)
  complete.note_edit(cur)
  complete.request()
  local r = last('complete')
  local names = {}
  for _, c in ipairs(r.params.context) do
    table.insert(names, c.path)
  end
  eq({ vim.fn.fnamemodify(api.nvim_buf_get_name(a), ':~:.'), vim.fn.fnamemodify(api.nvim_buf_get_name(b), ':~:.') },
    names, 'context paths')
  eq('B = 2', r.params.context[2].text)
  wait('the completion', function() return r.done end)
  eq(nil, r.err)
end)

-- A stand-in connection that answers with a fixed multi-line text: display and accept-line, deterministically.
local function canned(text)
  ds4.client = function()
    return {
      request = function(_, _, _, on_done, on_event)
        vim.schedule(function()
          on_event({ kind = 'content', text = text })
          on_done(nil, { text = text, finish_reason = 'length' })
        end)
        return 1
      end,
      cancel = function() end,
    }
  end
end

test('multi-line ghost text: first line at the cursor, the rest as virtual lines; accept-line', function()
  canned('foo()\n\tbar()\nbaz')
  ds4.setup({})
  local buf = code_buffer({ 'x = ', 'end' }, 1, 4)
  complete.request()
  wait('the suggestion', function() return complete.visible() end)
  local mark = api.nvim_buf_get_extmarks(buf, api.nvim_create_namespace('ds4'), 0, -1, { details = true })[1][4]
  eq(vim.fn.has('nvim-0.10') == 1 and 'inline' or 'eol', mark.virt_text_pos)
  eq('foo()', mark.virt_text[1][1])
  eq({ { { '        bar()', 'Ds4Suggestion' } }, { { 'baz', 'Ds4Suggestion' } } }, mark.virt_lines)
  complete.accept_line()
  eq({ 'x = foo()', '', 'end' }, api.nvim_buf_get_lines(buf, 0, -1, false))
  eq({ 2, 0 }, api.nvim_win_get_cursor(0))
  complete.on_text_changed() -- what Neovim fires after the edit: the rest must stay
  eq('\tbar()\nbaz', complete.suggestion())
  complete.accept_line()
  complete.accept_line()
  eq({ 'x = foo()', '\tbar()', 'baz', 'end' }, api.nvim_buf_get_lines(buf, 0, -1, false))
  eq(false, complete.visible())
end)

-- --- chat and health -------------------------------------------------------------------------------------------

test('a chat buffer bound to a session: send, stream, reopen', function()
  ds4.setup({ chat = { thinking = 'none', max_tokens = 6 } })
  ds4.client():call('session.delete', { name = 'nvim-test' }) -- left by an earlier run against this daemon
  local buf = require('ds4.chat').open('nvim-test')
  eq('nvim-test', vim.b[buf].ds4_session)
  api.nvim_buf_set_lines(buf, -2, -1, false, { 'Say hi.' }) -- the empty line under the heading
  local answer
  require('ds4.chat').send(buf, function(err, result) answer = { err, result } end)
  wait('the answer', function() return answer ~= nil end)
  eq(nil, answer[1])
  local text = table.concat(api.nvim_buf_get_lines(buf, 0, -1, false), '\n')
  local expect = '# ds4 chat: nvim-test\n\n## You\nSay hi.\n\n## ds4\n' .. answer[2].text
  eq(expect, text:sub(1, #expect), 'transcript')
  assert(text:match('## You\n$'), 'no prompt for the next message')
  api.nvim_buf_delete(buf, { force = true })
  -- Reopened, the buffer shows the session's stored conversation.
  buf = require('ds4.chat').open('nvim-test')
  text = table.concat(api.nvim_buf_get_lines(buf, 0, -1, false), '\n')
  eq(expect .. '\n\n## You\n', text, 'reopened transcript')
end)

test(':checkhealth ds4 reports the daemon and its model', function()
  vim.cmd('checkhealth ds4')
  local report = table.concat(api.nvim_buf_get_lines(0, 0, -1, false), '\n')
  assert(report:match('OK.-daemon %S+, protocol 1%.0, backend cpu'), report)
  assert(report:match('OK.-model: ds4 random tiny q2 model'), report)
end)

-- --- run -------------------------------------------------------------------------------------------------------

local failed = 0
local real_client = ds4.client
for _, t in ipairs(tests) do
  local ok, err = xpcall(t.fn, debug.traceback)
  ds4.client = real_client -- a test may have swapped in a stand-in
  io.stdout:write((ok and 'ok - ' or 'not ok - ') .. t.name .. '\n')
  if not ok then
    failed = failed + 1
    io.stdout:write('  ' .. tostring(err):gsub('\n', '\n  ') .. '\n')
  end
end
io.stdout:write(('%d passed, %d failed\n'):format(#tests - failed, failed))
vim.cmd((failed > 0 and 'cquit ' .. failed) or 'qall!')
