-- Completions as ghost text: debounced `complete` requests, streamed into virtual text at the cursor.
--
-- A request and the suggestion it shows are anchored to (buffer, cursor, changedtick): anything that moves
-- that anchor cancels the request (the daemon would also supersede it with the next `complete`, but an
-- explicit `cancel` frees it before the debounce has even run out) and hides the suggestion. Accepting
-- inserts the text as typed; accept-line inserts up to and including the next newline and keeps the rest.

local M = {}

local api = vim.api
local ns = api.nvim_create_namespace('ds4')
local INLINE = vim.fn.has('nvim-0.10') == 1 -- virt_text_pos = 'inline' exists from 0.10

local timer = (vim.uv or vim.loop).new_timer()
local inflight = nil -- { client, id, anchor }
local ghost = nil -- { anchor, text }: the suggestion on screen (still growing while its request streams)
local recent = {} -- buffer numbers, most recently edited first

local function config()
  return require('ds4').config
end

local function here()
  local cur = api.nvim_win_get_cursor(0)
  local buf = api.nvim_get_current_buf()
  return { buf = buf, row = cur[1] - 1, col = cur[2], tick = api.nvim_buf_get_changedtick(buf) }
end

local function at(anchor)
  local now = here()
  return anchor.buf == now.buf and anchor.row == now.row and anchor.col == now.col and anchor.tick == now.tick
end

-- --- display --------------------------------------------------------------------------------------------------

local function render()
  api.nvim_buf_clear_namespace(ghost.anchor.buf, ns, 0, -1)
  -- Virtual text shows a tab as one cell at best: expand it as the buffer would.
  local tab = string.rep(' ', vim.bo[ghost.anchor.buf].tabstop)
  local lines = vim.split(ghost.text:gsub('\t', tab), '\n', { plain = true })
  local hl = 'Ds4Suggestion'
  local opts = { virt_text = { { lines[1], hl } }, virt_text_pos = INLINE and 'inline' or 'eol', hl_mode = 'combine' }
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      opts.virt_lines[i - 1] = { { lines[i], hl } }
    end
  end
  api.nvim_buf_set_extmark(ghost.anchor.buf, ns, ghost.anchor.row, ghost.anchor.col, opts)
end

local function show(anchor, text)
  ghost = { anchor = anchor, text = text }
  render()
end

--- True while a suggestion is on screen where the cursor is.
function M.visible()
  return ghost ~= nil and ghost.text ~= '' and at(ghost.anchor)
end

--- The suggestion's text ('' when none), as accept would insert it.
function M.suggestion()
  return M.visible() and ghost.text or ''
end

--- True while a completion request is in flight (its suggestion may still grow).
function M.streaming()
  return inflight ~= nil
end

--- Cancel the request in flight, if any.
function M.cancel()
  if inflight then
    inflight.client:cancel(inflight.id)
    inflight = nil
  end
end

--- Hide the suggestion and cancel its request.
function M.dismiss()
  timer:stop()
  M.cancel()
  if ghost and api.nvim_buf_is_valid(ghost.anchor.buf) then
    api.nvim_buf_clear_namespace(ghost.anchor.buf, ns, 0, -1)
  end
  ghost = nil
end

-- --- the request ----------------------------------------------------------------------------------------------

-- A chunk of another buffer: the lines around where it was last changed, which is what the user has in mind.
local function chunk(buf)
  local n = config().context_lines
  local mark = api.nvim_buf_get_mark(buf, '.')[1]
  local first = math.max(0, (mark > 0 and mark - 1 or 0) - math.floor(n / 2))
  local text = table.concat(api.nvim_buf_get_lines(buf, first, first + n, false), '\n')
  if text:match('^%s*$') then
    return nil
  end
  return { path = vim.fn.fnamemodify(api.nvim_buf_get_name(buf), ':~:.'), text = text }
end

local function context(current)
  local chunks = {}
  for _, buf in ipairs(recent) do
    if #chunks >= config().context_buffers then
      break
    end
    local c = buf ~= current and api.nvim_buf_is_loaded(buf) and vim.bo[buf].buftype == '' and chunk(buf)
    if c then
      table.insert(chunks, 1, c) -- least recently edited first: the daemon wants the most stable first
    end
  end
  return chunks
end

local function prefix_suffix(anchor)
  local cfg = config()
  -- Start the prefix on a multiple of prefix_lines / 4: it then stays put while the cursor moves, and the
  -- daemon's prompt cache keeps serving it.
  local step = math.max(1, math.floor(cfg.prefix_lines / 4))
  local first = math.max(0, math.ceil((anchor.row - cfg.prefix_lines) / step) * step)
  local before = api.nvim_buf_get_lines(anchor.buf, first, anchor.row + 1, false)
  local line = before[#before]
  before[#before] = line:sub(1, anchor.col)
  local after = api.nvim_buf_get_lines(anchor.buf, anchor.row + 1, anchor.row + 1 + cfg.suffix_lines, false)
  table.insert(after, 1, line:sub(anchor.col + 1))
  return table.concat(before, '\n'), table.concat(after, '\n')
end

--- Ask for a completion at the cursor now (the debounced path ends here too).
function M.request()
  M.dismiss()
  local anchor = here()
  if vim.bo[anchor.buf].buftype ~= '' or not vim.bo[anchor.buf].modifiable then
    return
  end
  local client = require('ds4').client()
  if not client then
    return
  end
  local cfg = config()
  local prefix, suffix = prefix_suffix(anchor)
  local req = { client = client, anchor = anchor }
  local text = ''
  req.id = client:request('complete', {
    prefix = prefix,
    suffix = suffix,
    context = context(anchor.buf),
    max_tokens = cfg.max_tokens,
    time_budget_ms = cfg.time_budget_ms,
  }, function(err, result)
    if inflight ~= req then
      return -- dismissed meanwhile
    end
    inflight = nil
    if err then
      if err.code ~= 'disconnected' then
        vim.notify('ds4: ' .. err.message, vim.log.levels.WARN)
      end
    elseif result.finish_reason ~= 'cancelled' and result.text ~= '' and at(anchor) then
      show(anchor, result.text)
    end
  end, function(event)
    -- Stream into the ghost text: the first line appears after the first token, not the last.
    if event.kind == 'content' and inflight == req and at(anchor) then
      text = text .. event.text
      show(anchor, text)
    end
  end)
  inflight = req.id and req or nil
end

-- --- editing events -------------------------------------------------------------------------------------------

--- Remember which buffers were edited last (context chunks come from them).
function M.note_edit(buf)
  if recent[1] ~= buf then
    for i, b in ipairs(recent) do
      if b == buf then
        table.remove(recent, i)
        break
      end
    end
    table.insert(recent, 1, buf)
    recent[12] = nil -- a few more than context_buffers, so closed or special buffers can be skipped
  end
end

function M.on_text_changed()
  if ghost and at(ghost.anchor) then
    return -- our own accept_line, which left the rest of the suggestion on screen
  end
  M.dismiss()
  if config().auto then
    timer:start(config().debounce_ms, 0, vim.schedule_wrap(function()
      if api.nvim_get_mode().mode:sub(1, 1) == 'i' then
        M.request()
      end
    end))
  end
end

function M.on_cursor_moved()
  if (ghost and not at(ghost.anchor)) or (inflight and not at(inflight.anchor)) then
    M.dismiss()
  end
end

-- --- accepting ------------------------------------------------------------------------------------------------

local function insert(a, text)
  local lines = vim.split(text, '\n', { plain = true })
  api.nvim_buf_set_text(a.buf, a.row, a.col, a.row, a.col, lines)
  local row = a.row + #lines - 1
  local col = (#lines == 1 and a.col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { row + 1, col })
  return { buf = a.buf, row = row, col = col, tick = api.nvim_buf_get_changedtick(a.buf) }
end

--- Insert the whole suggestion.
function M.accept()
  if not M.visible() then
    return
  end
  local anchor, text = ghost.anchor, ghost.text
  M.dismiss() -- also stops a suggestion still streaming: what is accepted is what was shown
  insert(anchor, text)
end

--- Insert the suggestion up to and including its next newline; the rest stays on screen.
function M.accept_line()
  if not M.visible() then
    return
  end
  local anchor, text = ghost.anchor, ghost.text
  local nl = text:find('\n', 1, true) or #text
  M.dismiss()
  local after = insert(anchor, text:sub(1, nl))
  if nl < #text then
    show(after, text:sub(nl + 1))
  end
end

return M
