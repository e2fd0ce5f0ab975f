-- The daemon connection: msgpack-rpc (docs/PROTOCOL.md) over a libuv pipe, with nothing beyond Neovim itself.
--
-- Owns socket-path resolution, framing, msgids, and routing of responses and `stream` notifications to the
-- callbacks of the request they belong to. It knows no method but `cancel`; completion, chat and health build
-- their requests on top of it.

local uv = vim.uv or vim.loop -- vim.uv from 0.10; vim.loop is the same luv module on older releases

local M = {}

--- The socket, resolved as every ds4 client does (client/ds4c/protocol.py): explicit path, $DS4_SOCKET,
--- $XDG_RUNTIME_DIR/ds4/ds4.sock when that directory exists, /tmp/ds4-<uid>/ds4.sock.
function M.socket_path(explicit)
  if explicit and explicit ~= '' then
    return explicit
  end
  local env = os.getenv('DS4_SOCKET')
  if env and env ~= '' then
    return env
  end
  local runtime = os.getenv('XDG_RUNTIME_DIR')
  if runtime and runtime ~= '' and vim.fn.isdirectory(runtime) == 1 then
    return runtime .. '/ds4/ds4.sock'
  end
  return ('/tmp/ds4-%d/ds4.sock'):format(uv.getuid())
end

-- msgpack nil decodes to vim.NIL; callers want plain Lua nil.
local function value(v)
  if v == vim.NIL then
    return nil
  end
  return v
end

local Client = {}
Client.__index = Client

--- Open a connection. Requests may be sent at once: libuv queues writes until the pipe has connected, and a
--- failed connect answers every pending request with error code `disconnected`.
function M.connect(path)
  local self = setmetatable({
    path = path,
    pipe = uv.new_pipe(false),
    -- Incremental decoder: it keeps a message split across reads and resumes with the next chunk. The
    -- documented vim.mpack.decode only takes whole values; Unpacker is there in every release from 0.7 on.
    unpack = vim.mpack.Unpacker(),
    next_id = 0,
    pending = {},
    closed = false,
  }, Client)
  self.pipe:connect(path, function(err)
    if err then
      return self:_fail(('cannot connect to %s: %s'):format(path, err))
    end
    self.pipe:read_start(function(read_err, data)
      if read_err or not data then
        return self:_fail(read_err or 'the daemon closed the connection')
      end
      self:_feed(data)
    end)
  end)
  return self
end

-- libuv callbacks run where the editor API is off limits: decode here, handle the messages on the main loop.
function Client:_feed(data)
  local pos = 1
  while pos <= #data do
    local ok, msg, next_pos = pcall(self.unpack, data, pos)
    if not ok then
      return self:_fail('bad msgpack from the daemon: ' .. tostring(msg))
    end
    pos = next_pos
    if msg ~= nil then -- nil: the chunk ended inside a message; the unpacker holds the part it has seen
      vim.schedule(function()
        self:_dispatch(msg)
      end)
    end
  end
end

function Client:_dispatch(msg)
  if msg[1] == 2 and msg[2] == 'stream' then
    local event = msg[3][1]
    local req = self.pending[event.id]
    if req and req.on_event then
      req.on_event(event)
    end
  elseif msg[1] == 1 then
    local req = self.pending[msg[2]]
    self.pending[msg[2]] = nil
    if req then
      req.on_done(value(msg[3]), value(msg[4]))
    end
  end
end

function Client:_fail(reason)
  if self.closed then
    return
  end
  self.closed = true
  self.error = reason
  if not self.pipe:is_closing() then
    self.pipe:close()
  end
  vim.schedule(function()
    local pending = self.pending
    self.pending = {}
    for _, req in pairs(pending) do
      req.on_done({ code = 'disconnected', message = reason }, nil)
    end
  end)
end

--- Send a request; on_done(err, result) gets the response (err is the daemon's {code, message} map),
--- on_event(event) each `stream` notification of it. Returns the msgid (what `cancel` names).
function Client:request(method, params, on_done, on_event)
  on_done = on_done or function() end
  if self.closed then
    vim.schedule(function()
      on_done({ code = 'disconnected', message = self.error }, nil)
    end)
    return nil
  end
  self.next_id = self.next_id % 0xffffffff + 1 -- msgids are uint32
  local id = self.next_id
  self.pending[id] = { on_done = on_done, on_event = on_event }
  -- params is an array holding one map; an empty Lua table would encode as an array, so send [] for "none".
  local args = (params and next(params)) and { params } or {}
  self.pipe:write(vim.mpack.encode({ 0, id, method, args }))
  return id
end

--- Stop a request still in flight (it answers with what it has so far, finish_reason "cancelled").
function Client:cancel(id)
  if id and self.pending[id] then
    self:request('cancel', { id = id })
  end
end

--- Blocking request for commands and :checkhealth: returns err, result. The editor keeps processing events.
function Client:call(method, params, timeout_ms)
  local done, err, result = false, nil, nil
  self:request(method, params, function(e, r)
    done, err, result = true, e, r
  end)
  if not vim.wait(timeout_ms or 5000, function()
    return done
  end, 5) then
    return { code = 'timeout', message = method .. ': no answer from the daemon' }, nil
  end
  return err, result
end

function Client:close()
  self:_fail('closed by the client')
end

return M
