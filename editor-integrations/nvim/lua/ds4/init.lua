-- ds4 for Neovim: inline completions and chat from the local ds4 daemon (`ds4d serve`).
--
-- This module owns the configuration, the one shared daemon connection, and the wiring (autocommands,
-- keymaps, user commands) that `setup` installs. Ghost text lives in ds4.complete, the chat buffer in
-- ds4.chat, the wire in ds4.rpc, and `:checkhealth ds4` in ds4.health.

local rpc = require('ds4.rpc')

local M = {}

local defaults = {
  socket = nil, -- nil: resolved like every ds4 client ($DS4_SOCKET, $XDG_RUNTIME_DIR/ds4/ds4.sock, ...)
  auto = true, -- ask for a completion whenever typing pauses in insert mode
  debounce_ms = 150,
  max_tokens = 64,
  time_budget_ms = nil, -- the daemon stops a completion this long after receiving it
  prefix_lines = 2000, -- how much of the buffer around the cursor is sent
  suffix_lines = 200,
  context_buffers = 3, -- recently edited other buffers sent as context chunks
  context_lines = 80, -- lines of each, around its last change
  keymaps = { -- insert mode; false disables one
    accept = '<Tab>',
    accept_line = '<C-Right>',
    dismiss = '<C-]>',
    trigger = '<M-\\>',
  },
  chat = {
    thinking = 'none', -- 'none', 'high' or 'max'
    max_tokens = nil,
  },
}

M.config = vim.deepcopy(defaults)

-- The connection is opened lazily and reopened after a failure, but at most every few seconds: with no
-- daemon running, typing must not try (and report) a connect per keystroke.
local client, retry_at, reported = nil, 0, nil
local RETRY_MS = 5000

--- The shared daemon connection, or nil while the daemon cannot be reached.
function M.client()
  if client and not client.closed then
    return client
  end
  local now = (vim.uv or vim.loop).now()
  if now < retry_at then
    return nil
  end
  retry_at = now + RETRY_MS
  local this = rpc.connect(rpc.socket_path(M.config.socket))
  this:request('hello', { protocol = '1.0', client = 'nvim' }, function(err, info)
    if err then -- a failed connect lands here too; say so once, not at every retry
      if err.message ~= reported then
        reported = err.message
        vim.notify('ds4: ' .. err.message .. ' (is `ds4d serve` running?)', vim.log.levels.WARN)
      end
      return
    end
    reported, this.info = nil, info
    if info.model.demo then
      vim.notify('ds4: the daemon serves its tiny random demo model; its completions are gibberish',
        vim.log.levels.WARN)
    end
  end)
  client = this
  return client
end

local function map_accept(lhs, fn)
  -- An expr mapping may not change the buffer, so it returns a <Cmd> that does; without a suggestion the key
  -- keeps its usual meaning.
  vim.keymap.set('i', lhs, function()
    if require('ds4.complete').visible() then
      return ('<Cmd>lua require("ds4.complete").%s()<CR>'):format(fn)
    end
    return lhs
  end, { expr = true, desc = 'ds4: ' .. fn })
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  local complete = require('ds4.complete')
  vim.cmd('highlight default link Ds4Suggestion Comment')

  local group = vim.api.nvim_create_augroup('ds4', { clear = true })
  local function on(events, fn)
    vim.api.nvim_create_autocmd(events, { group = group, callback = function(ev) fn(ev.buf) end })
  end
  on({ 'TextChanged', 'TextChangedI' }, complete.note_edit)
  on('TextChangedI', complete.on_text_changed)
  on('CursorMovedI', complete.on_cursor_moved)
  on({ 'InsertLeave', 'BufLeave' }, complete.dismiss)

  local keys = M.config.keymaps
  if keys.accept then
    map_accept(keys.accept, 'accept')
  end
  if keys.accept_line then
    map_accept(keys.accept_line, 'accept_line')
  end
  if keys.dismiss then
    vim.keymap.set('i', keys.dismiss, complete.dismiss, { desc = 'ds4: dismiss' })
  end
  if keys.trigger then
    vim.keymap.set('i', keys.trigger, complete.request, { desc = 'ds4: complete now' })
  end

  vim.api.nvim_create_user_command('Ds4Chat', function(c)
    require('ds4.chat').open(c.args ~= '' and c.args or nil)
  end, { nargs = '?', desc = 'ds4: open a chat bound to a daemon session (a new one without a name)' })
  vim.api.nvim_create_user_command('Ds4Toggle', function()
    M.config.auto = not M.config.auto
    complete.dismiss()
    vim.notify('ds4: completion as you type ' .. (M.config.auto and 'on' or 'off'))
  end, { desc = 'ds4: toggle completion as you type' })
end

return M
