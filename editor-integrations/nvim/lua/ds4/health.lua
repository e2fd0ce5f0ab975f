-- `:checkhealth ds4`: is the daemon reachable on the resolved socket, and what does it serve.

local M = {}

function M.check()
  -- vim.health.start/ok/... from 0.9; require('health').report_* before (0.7, 0.8).
  local h = vim.health or require('health')
  local start, ok, warn, err, info =
    h.start or h.report_start, h.ok or h.report_ok, h.warn or h.report_warn, h.error or h.report_error,
    h.info or h.report_info

  start('ds4')
  local rpc = require('ds4.rpc')
  local path = rpc.socket_path(require('ds4').config.socket)
  info('socket: ' .. path)
  local client = rpc.connect(path)
  local e, hello = client:call('hello', { protocol = '1.0', client = 'nvim-checkhealth' }, 5000)
  client:close()
  if e then
    err('the daemon is not reachable: ' .. e.message, {
      'start it with `ds4d serve` (or enable docs/ds4d.socket for systemd socket activation)',
      'or point the plugin at its socket: require("ds4").setup({ socket = "/path/to/ds4.sock" })',
    })
    return
  end
  ok(('daemon %s, protocol %s, backend %s, context %d tokens'):format(hello.daemon, hello.protocol,
    hello.backend, hello.ctx))
  local model = hello.model
  local line = ('model: %s (%s, %d layers)'):format(model.name, model.quant, model.n_layer)
  if model.demo then
    warn(line .. ': the tiny random demo model; its output is gibberish', {
      'give the daemon a model: ds4d serve -m /path/to/ds4flash.gguf',
    })
  else
    ok(line)
  end
end

return M
