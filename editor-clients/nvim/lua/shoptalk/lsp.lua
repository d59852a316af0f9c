--- The ShopTalk language server inside Neovim: starting it for a buffer,
--- finding its client, and the requests ShopTalk adds to LSP
--- (shoptalk/findModule, shoptalk/status).
local config = require("shoptalk.config")

local M = {}

M.name = "shoptalk"

local has_011 = vim.fn.has("nvim-0.11") == 1

-- Neovim 0.11 made client methods proper methods (`client:request`); 0.10
-- only has the closures (`client.request`), and 0.11 deprecates those.
---@param client vim.lsp.Client
---@return boolean ok, integer|nil request_id
function M.request(client, method, params, handler, bufnr)
  if has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

---@param client vim.lsp.Client
function M.notify(client, method, params)
  if has_011 then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

---@param client vim.lsp.Client
function M.cancel(client, request_id)
  if has_011 then
    return client:cancel_request(request_id)
  end
  return client.cancel_request(request_id)
end

---@param client vim.lsp.Client
function M.stop(client, force)
  if has_011 then
    return client:stop(force)
  end
  return client.stop(force)
end

--- The repository root of a buffer (where the server looks for the
--- repository's promoted model).
---@param bufnr integer
---@return string
function M.root_dir(bufnr)
  local root = vim.fs.root(bufnr, config.options.root_markers)
  if root then
    return root
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  if name ~= "" then
    return vim.fs.dirname(vim.fs.normalize(name))
  end
  return vim.fn.getcwd()
end

---@param bufnr integer|nil
---@return vim.lsp.Client|nil
function M.client(bufnr)
  local filter = { name = M.name }
  if bufnr then
    filter.bufnr = bufnr == 0 and vim.api.nvim_get_current_buf() or bufnr
  end
  return vim.lsp.get_clients(filter)[1]
end

local reported_missing = false

--- Start (or reuse) the server for a buffer's repository and attach it.
---@param bufnr integer
---@return integer|nil client_id
function M.start(bufnr)
  local cmd = config.server_cmd()
  if not cmd then
    if not reported_missing then
      reported_missing = true
      vim.notify(
        "shoptalk: no Python interpreter found; set `python` in require('shoptalk').setup{} "
          .. "to one that has shoptalk installed (pip install 'shoptalk[serve]')",
        vim.log.levels.ERROR
      )
    end
    return nil
  end
  if vim.fn.executable(cmd[1]) ~= 1 then
    if not reported_missing then
      reported_missing = true
      vim.notify(
        ("shoptalk: cannot start the server: %s is not executable; fix `python` (or `cmd`) "
          .. "in setup(), see :checkhealth shoptalk"):format(cmd[1]),
        vim.log.levels.ERROR
      )
    end
    return nil
  end
  return vim.lsp.start({
    name = M.name,
    cmd = cmd,
    root_dir = M.root_dir(bufnr),
    init_options = config.init_options(),
    settings = config.init_options(),
    on_exit = function(code, signal)
      if code ~= 0 and signal ~= 15 then
        vim.schedule(function()
          vim.notify(
            ("shoptalk: the server exited (code %d); see :LspLog, run :checkhealth shoptalk, "
              .. "then :ShopTalkRestart"):format(code),
            vim.log.levels.ERROR
          )
        end)
      end
    end,
  }, { bufnr = bufnr })
end

--- Send changed options to running servers (workspace/didChangeConfiguration).
function M.push_settings()
  for _, client in ipairs(vim.lsp.get_clients({ name = M.name })) do
    client.config.settings = config.init_options()
    M.notify(client, "workspace/didChangeConfiguration", { settings = config.init_options() })
  end
end

--- Stop every ShopTalk client and start again for the buffers they served.
function M.restart()
  local buffers = {}
  for _, client in ipairs(vim.lsp.get_clients({ name = M.name })) do
    for bufnr in pairs(client.attached_buffers) do
      table.insert(buffers, bufnr)
    end
    M.stop(client, true)
  end
  vim.defer_fn(function()
    for _, bufnr in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(bufnr) then
        M.start(bufnr)
      end
    end
  end, 200)
  return #buffers
end

--- Call a ShopTalk request on the current buffer's server.
---@param method string
---@param params table
---@param callback fun(err: table|nil, result: any)
function M.call(method, params, callback)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.client(bufnr) or M.client()
  if not client then
    callback({
      message = "no ShopTalk server is running; open a file of a configured filetype "
        .. "(or :ShopTalkRestart) and see :checkhealth shoptalk",
    }, nil)
    return
  end
  local attached = client.attached_buffers[bufnr] and bufnr or nil
  M.request(client, method, params, function(err, result)
    callback(err, result)
  end, attached)
end

return M
