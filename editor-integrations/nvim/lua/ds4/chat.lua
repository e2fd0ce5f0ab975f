-- The chat buffer: a markdown scratch buffer bound to a daemon session.
--
-- The session holds the conversation and its cached model state, so each message sends only the new user
-- turn (`chat` with `session`) and pays only for its own tokens. The buffer is a view: the text under the
-- last "## You" heading is the next message; <CR> in normal mode (or :Ds4ChatSend) sends it and streams the
-- answer below, thinking as a quoted block when the model thinks.

local M = {}

local api = vim.api
local YOU, MODEL = '## You', '## ds4'

local function append(buf, text, quote)
  local last = api.nvim_buf_line_count(buf)
  local parts = vim.split(text, '\n', { plain = true })
  parts[1] = api.nvim_buf_get_lines(buf, last - 1, last, false)[1] .. parts[1]
  for i = 2, #parts do
    parts[i] = quote .. parts[i]
  end
  api.nvim_buf_set_lines(buf, last - 1, last, false, parts)
end

local function content_text(content)
  if type(content) == 'table' then -- a list of {type = "text", text} parts
    local texts = {}
    for _, part in ipairs(content) do
      table.insert(texts, part.text or '')
    end
    return table.concat(texts)
  end
  return content or ''
end

local function render_history(buf, name, messages)
  api.nvim_buf_set_lines(buf, 0, -1, false, { '# ds4 chat: ' .. name })
  for _, m in ipairs(messages) do
    if m.role == 'user' or m.role == 'assistant' then
      append(buf, '\n\n' .. (m.role == 'user' and YOU or MODEL) .. '\n', '')
      if m.reasoning_content and m.reasoning_content ~= vim.NIL and m.reasoning_content ~= '' then
        append(buf, '> ' .. m.reasoning_content, '> ')
        append(buf, '\n\n', '')
      end
      append(buf, content_text(m.content), '')
    end
  end
  append(buf, '\n\n' .. YOU .. '\n', '')
end

local function cursor_to_end(buf)
  for _, win in ipairs(api.nvim_list_wins()) do
    if api.nvim_win_get_buf(win) == buf then
      api.nvim_win_set_cursor(win, { api.nvim_buf_line_count(buf), 0 })
    end
  end
end

--- Send the text under the last "## You" heading of the chat buffer; on_done(err, result) when answered.
function M.send(buf, on_done)
  buf = buf or api.nvim_get_current_buf()
  local session = vim.b[buf].ds4_session
  if not session or vim.b[buf].ds4_busy then
    return
  end
  local lines = api.nvim_buf_get_lines(buf, 0, -1, false)
  local start = #lines
  while start > 0 and lines[start] ~= YOU do
    start = start - 1
  end
  local message = vim.trim(table.concat(lines, '\n', start + 1))
  if message == '' then
    return
  end
  local client = require('ds4').client()
  if not client then
    return
  end
  local cfg = require('ds4').config.chat
  append(buf, '\n\n' .. MODEL .. '\n', '')
  local kind = nil -- what the last streamed piece was, to start a quote or end one
  vim.b[buf].ds4_busy = true
  vim.b[buf].ds4_request = client:request('chat', {
    session = session,
    messages = { { role = 'user', content = message } },
    thinking = cfg.thinking,
    max_tokens = cfg.max_tokens,
  }, function(err, result)
    vim.b[buf].ds4_busy, vim.b[buf].ds4_request = nil, nil
    if err then
      append(buf, '\n\n_error: ' .. err.message .. '_', '')
    elseif result.finish_reason ~= 'eos' and result.finish_reason ~= 'stop' then
      append(buf, '\n\n_(' .. result.finish_reason .. ')_', '')
    end
    append(buf, '\n\n' .. YOU .. '\n', '')
    cursor_to_end(buf)
    if on_done then
      on_done(err, result)
    end
  end, function(event)
    if event.kind == 'reasoning' then
      append(buf, (kind ~= 'reasoning' and '> ' or '') .. event.text, '> ')
    elseif event.kind == 'content' then
      append(buf, (kind == 'reasoning' and '\n\n' or '') .. event.text, '')
    end
    kind = event.kind ~= 'progress' and event.kind or kind
    cursor_to_end(buf)
  end)
end

--- Stop the answer being streamed into the chat buffer.
function M.cancel(buf)
  buf = buf or api.nvim_get_current_buf()
  local client = require('ds4').client()
  if client then
    client:cancel(vim.b[buf].ds4_request)
  end
end

--- Open (or create) the session `name` (a generated name when nil) in a chat buffer; returns the buffer.
function M.open(name)
  local client = require('ds4').client()
  if not client then
    return nil
  end
  local err, session = client:call('session.open', { name = name })
  if err then
    vim.notify('ds4: ' .. err.message, vim.log.levels.ERROR)
    return nil
  end
  local bufname = 'ds4://chat/' .. session.name
  local buf = vim.fn.bufnr(bufname)
  if buf == -1 then
    buf = api.nvim_create_buf(true, false)
    api.nvim_buf_set_name(buf, bufname)
    vim.bo[buf].buftype = 'nofile'
    vim.bo[buf].filetype = 'markdown'
    vim.b[buf].ds4_session = session.name
    render_history(buf, session.name, session.messages)
    vim.keymap.set('n', '<CR>', function() M.send(buf) end, { buffer = buf, desc = 'ds4: send the message' })
    vim.keymap.set('n', '<C-c>', function() M.cancel(buf) end, { buffer = buf, desc = 'ds4: stop the answer' })
    api.nvim_buf_create_user_command(buf, 'Ds4ChatSend', function() M.send(buf) end, {})
  end
  api.nvim_set_current_buf(buf)
  cursor_to_end(buf)
  return buf
end

return M
