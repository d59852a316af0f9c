--- ShopTalk for Neovim: completions from a model tuned on your team's git
--- history, and "which module does X?" answers, from the local `shoptalk
--- serve` language server.
---
--- require("shoptalk").setup({ python = "~/.venvs/shoptalk/bin/python" })
local config = require("shoptalk.config")
local controls = require("shoptalk.controls")
local ghost = require("shoptalk.ghost")
local lsp = require("shoptalk.lsp")

local M = {}

local islist = vim.islist or vim.tbl_islist

local actions = {
  accept = { fn = ghost.accept, desc = "accept the suggestion" },
  accept_word = { fn = ghost.accept_word, desc = "accept the next word of the suggestion" },
  accept_line = { fn = ghost.accept_line, desc = "accept the next line of the suggestion" },
  dismiss = { fn = ghost.dismiss, desc = "dismiss the suggestion" },
  trigger = { fn = ghost.trigger, desc = "ask for a suggestion now" },
}

--- The insert-mode mapping of `lhs` that applies in a buffer, if any.
local function current_mapping(bufnr, lhs)
  local existing = vim.api.nvim_buf_call(bufnr, function()
    return vim.fn.maparg(lhs, "i", false, true)
  end)
  if type(existing) ~= "table" or vim.tbl_isempty(existing) then
    return nil
  end
  return existing
end

--- Neovim's own default mappings (e.g. <Tab> jumping in snippets) are kept
--- working behind ours: when there is nothing to accept we call them.
local function is_neovim_default(mapping)
  return mapping.buffer == 0 and (mapping.desc or ""):match("^vim%.") ~= nil
end

local function set_keymaps(bufnr)
  for name, action in pairs(actions) do
    local lhs = config.options.keymaps[name]
    local existing = lhs and current_mapping(bufnr, lhs)
    local ours = existing and (existing.desc or ""):match("^shoptalk: ") ~= nil
    -- A key the user (or another plugin) mapped is left alone: ShopTalk
    -- never takes a key away.
    if lhs and (not existing or ours or is_neovim_default(existing)) then
      local fallback = function()
        return lhs
      end
      if existing and not ours and existing.expr == 1 and existing.callback then
        fallback = existing.callback
      end
      vim.keymap.set("i", lhs, function()
        if action.fn(bufnr) then
          return ""
        end
        -- Nothing to accept: the key keeps its own meaning.
        return fallback()
      end, { buffer = bufnr, expr = true, desc = "shoptalk: " .. action.desc })
    end
  end
end

local uv = vim.uv or vim.loop
local PREFILL_DELAY_MS = 250

--- Tell the server where the cursor rests (shoptalk/prefill) so it evaluates
--- the prompt before the first keystroke there.
local function watch_cursor(bufnr, client)
  local timer = uv.new_timer()
  local group = vim.api.nvim_create_augroup("shoptalk.prefill." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ "CursorMoved", "InsertEnter" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      timer:stop()
      timer:start(
        PREFILL_DELAY_MS,
        0,
        vim.schedule_wrap(function()
          if not vim.api.nvim_buf_is_valid(bufnr) or client.is_stopped and client:is_stopped() then
            return
          end
          local win = vim.fn.bufwinid(bufnr)
          if win ~= -1 then
            lsp.notify(client, "shoptalk/prefill", vim.lsp.util.make_position_params(win, client.offset_encoding))
          end
        end)
      )
    end,
  })
  vim.api.nvim_create_autocmd({ "BufWipeout", "LspDetach" }, {
    group = group,
    buffer = bufnr,
    once = true,
    callback = function()
      timer:stop()
      if not timer:is_closing() then
        timer:close()
      end
      pcall(vim.api.nvim_del_augroup_by_id, group)
    end,
  })
end

-- The server's last shoptalk/status per client, for the statusline.
---@type table<integer, table>
local last_status = {}
local STATUS_POLL_MS = 3000
local pollers = {}

--- Ask the server for its status every few seconds while it runs, so that
--- statusline() is a table lookup (it is called at every redraw).
local function poll_status(client)
  if pollers[client.id] then
    return
  end
  local timer = uv.new_timer()
  pollers[client.id] = timer
  local function tick()
    if client.is_stopped and client:is_stopped() then
      timer:stop()
      if not timer:is_closing() then
        timer:close()
      end
      pollers[client.id] = nil
      last_status[client.id] = nil
      return
    end
    lsp.request(client, "shoptalk/status", vim.empty_dict(), function(err, result)
      if not err and type(result) == "table" then
        local before = M.statusline()
        last_status[client.id] = result
        if M.statusline() ~= before then
          pcall(vim.cmd.redrawstatus)
        end
      end
    end)
  end
  timer:start(0, STATUS_POLL_MS, vim.schedule_wrap(tick))
end

--- Ask the server whether the buffer's file may reach the model at all.
local function ask_exclusion(bufnr, client)
  local params = { textDocument = { uri = vim.uri_from_bufnr(bufnr) } }
  lsp.request(client, "shoptalk/exclusion", params, function(err, result)
    if not err and vim.api.nvim_buf_is_valid(bufnr) then
      controls.set_exclusion(bufnr, result)
    end
  end, bufnr)
end

local function on_attach(bufnr, client)
  if config.inline_mode() == "off" then
    return
  end
  ask_exclusion(bufnr, client)
  poll_status(client)
  ghost.attach(bufnr, client)
  set_keymaps(bufnr)
  watch_cursor(bufnr, client)
end

local function model_kind(status)
  if status.personal == true or status.source == "personal" then
    return "personal"
  end
  return status.source == "promoted" and "team" or "base"
end

--- A statusline component: "ShopTalk: team", "ShopTalk: loading",
--- "ShopTalk: over budget (2.1 s > 1.5 s)", "ShopTalk: off", "ShopTalk:
--- snoozed (14 min)", "ShopTalk: off for python", "ShopTalk: off for this
--- file (...)"; "" in a buffer ShopTalk does not serve. Cheap: it reads what
--- the server said last. For lualine: `lualine_x = { require("shoptalk").statusline }`;
--- for 'statusline': `%{v:lua.require'shoptalk'.statusline()}`.
---@return string
function M.statusline()
  local bufnr = vim.api.nvim_get_current_buf()
  local client = lsp.client(bufnr)
  local off = controls.off_reason(bufnr)
  if not client then
    local served = vim.tbl_contains(config.options.filetypes, vim.bo[bufnr].filetype)
    return (served and off) and ("ShopTalk: " .. off.text) or ""
  end
  if off then
    return "ShopTalk: " .. off.text
  end
  local status = last_status[client.id]
  if not status then
    return "ShopTalk: starting"
  end
  return "ShopTalk: " .. (M.answer_note(status) or model_kind(status))
end

--- Turn suggestions off or on everywhere, or (`what` = "filetype") for the
--- current buffer's filetype. Returns whether they are now on.
---@param what string|nil
---@return boolean
function M.toggle(what)
  local on
  if what == "filetype" or what == "ft" then
    local ft = vim.bo.filetype
    on = controls.toggle_filetype(ft)
    vim.notify(("shoptalk: suggestions %s for %s"):format(on and "on" or "off", ft))
  elseif what == nil or what == "" then
    on = controls.toggle()
    vim.notify("shoptalk: suggestions " .. (on and "on" or "off"))
  else
    vim.notify(("shoptalk: :ShopTalkToggle [filetype], not %q"):format(what), vim.log.levels.ERROR)
    return controls.may_request(vim.api.nvim_get_current_buf(), false)
  end
  return on
end

--- Pause suggestions for `minutes` (0 ends the snooze).
---@param minutes number
function M.snooze(minutes)
  controls.snooze(minutes)
  if minutes > 0 then
    vim.notify(("shoptalk: suggestions snoozed for %d min"):format(minutes))
  else
    vim.notify("shoptalk: suggestions on again")
  end
end

--- Configure the plugin and start the server for the configured filetypes.
--- Calling it again applies new options to running servers.
---@param opts table|nil see :help shoptalk-options
local listening = false

function M.setup(opts)
  config.setup(opts)
  controls.setup(config.options)
  if not listening then
    listening = true
    controls.on_change(ghost.apply_controls)
  end
  require("shoptalk.commands").define()
  vim.api.nvim_set_hl(0, "ShopTalkGhost", { link = "Comment", default = true })
  for name, action in pairs(actions) do
    vim.keymap.set("i", ("<Plug>(shoptalk-%s)"):format(name:gsub("_", "-")), function()
      action.fn(0)
    end, { desc = "shoptalk: " .. action.desc })
  end

  local group = vim.api.nvim_create_augroup("shoptalk", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = config.options.filetypes,
    callback = function(args)
      if vim.bo[args.buf].buftype == "" then
        lsp.start(args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd("LspAttach", {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == lsp.name then
        on_attach(args.buf, client)
      end
    end,
  })
  vim.api.nvim_create_autocmd("LspDetach", {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == lsp.name then
        ghost.detach(args.buf)
        controls.forget(args.buf)
      end
    end,
  })

  lsp.push_settings()
  -- Buffers opened before setup() (lazy loading) attach now.
  local filetypes = {}
  for _, ft in ipairs(config.options.filetypes) do
    filetypes[ft] = true
  end
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if
      vim.api.nvim_buf_is_loaded(bufnr)
      and vim.bo[bufnr].buftype == ""
      and filetypes[vim.bo[bufnr].filetype]
      and not lsp.client(bufnr)
    then
      lsp.start(bufnr)
    end
  end
end

--- Open a module's file at its range.
---@param module { id: string, uri: string, range: table|nil }
function M.jump(module)
  local range = module.range
    or { start = { line = 0, character = 0 }, ["end"] = { line = 0, character = 0 } }
  local client = lsp.client(0) or lsp.client()
  local encoding = client and client.offset_encoding or "utf-16"
  vim.cmd("normal! m'")
  vim.lsp.util.show_document({ uri = module.uri, range = range }, encoding, { focus = true })
end

local function module_label(module)
  local score = type(module.score) == "number" and ("%.2f"):format(module.score) or "-"
  if type(module.confidence) == "string" and module.confidence ~= "" then
    score = module.confidence -- high / medium / low, calibrated by the server
  end
  local reason = (module.reason and module.reason ~= vim.NIL) and ("  " .. module.reason) or ""
  return ("%s  [%s]%s"):format(module.id, score, reason)
end

--- Ask the server which modules match `query`, let the user pick one, and
--- jump to it. `on_result` (for scripts) receives the modules list.
---@param query string|nil asks with vim.ui.input when empty
---@param on_result fun(modules: table[]|nil, err: string|nil)|nil
function M.find_module(query, on_result)
  query = vim.trim(query or "")
  if query == "" then
    vim.ui.input({ prompt = "ShopTalk — which module? " }, function(input)
      if input and vim.trim(input) ~= "" then
        M.find_module(input, on_result)
      end
    end)
    return
  end
  local params = { query = query, limit = config.options.module_limit }
  lsp.call("shoptalk/findModule", params, function(err, result)
    if err then
      local message = "shoptalk: module lookup failed: " .. (err.message or vim.inspect(err))
      vim.notify(message, vim.log.levels.ERROR)
      if on_result then
        on_result(nil, message)
      end
      return
    end
    local modules = (result and result.modules) or {}
    if on_result then
      on_result(modules, nil)
    end
    if #modules == 0 then
      vim.notify(("shoptalk: no module matches %q"):format(query), vim.log.levels.WARN)
      return
    end
    if result.abstained == true then
      local message = type(result.message) == "string" and result.message ~= "" and result.message
        or ("no module clearly does %q"):format(query)
      vim.notify("shoptalk: " .. message, vim.log.levels.WARN)
    end
    if config.options.picker == "quickfix" then
      local items = {}
      for _, module in ipairs(modules) do
        local start = module.range and module.range.start or { line = 0, character = 0 }
        table.insert(items, {
          filename = vim.uri_to_fname(module.uri),
          lnum = start.line + 1,
          col = start.character + 1,
          text = module_label(module),
        })
      end
      vim.fn.setqflist({}, " ", { title = "ShopTalk: " .. query, items = items })
      vim.cmd("cfirst")
      vim.cmd("botright copen")
      vim.cmd("wincmd p")
      return
    end
    if #modules == 1 then
      M.jump(modules[1])
      return
    end
    vim.ui.select(modules, {
      prompt = ("Modules for %q"):format(query),
      format_item = module_label,
      kind = "shoptalk.module",
    }, function(choice)
      if choice then
        M.jump(choice)
      end
    end)
  end)
end

local function describe(value)
  if value == nil or value == vim.NIL then
    return "-"
  end
  if type(value) ~= "table" then
    return tostring(value)
  end
  if vim.tbl_isempty(value) then
    return "-"
  end
  local parts = {}
  if islist(value) then
    for _, item in ipairs(value) do
      table.insert(parts, describe(item))
    end
  else
    for key, item in pairs(value) do
      table.insert(parts, ("%s=%s"):format(key, describe(item)))
    end
    table.sort(parts)
  end
  return table.concat(parts, ", ")
end

--- Why suggestions are slow or missing, from a shoptalk/status answer:
--- "loading", "over budget (2.1 s > 1.5 s)", or nil when they come.
---@param status table
---@return string|nil
function M.answer_note(status)
  if status.loading == true then
    return "loading"
  end
  local answer = type(status.answer) == "table" and status.answer or nil
  if answer and answer.state == "over_budget" and type(answer.message) == "string" then
    return answer.message
  end
  return nil
end

--- Lines describing a shoptalk/status answer, known keys first.
---@param status table
---@return string[]
function M.status_lines(status)
  local lines = {}
  local known = { "model", "adapter", "device", "training", "queue" }
  local seen = { answer = true }
  for _, key in ipairs(known) do
    seen[key] = true
    table.insert(lines, ("%-9s %s"):format(key .. ":", describe(status[key])))
  end
  local note = M.answer_note(status)
  if note then
    table.insert(lines, ("%-9s %s"):format("answer:", note))
  end
  local others = {}
  for key in pairs(status) do
    if not seen[key] then
      table.insert(others, key)
    end
  end
  table.sort(others)
  for _, key in ipairs(others) do
    table.insert(lines, ("%-9s %s"):format(key .. ":", describe(status[key])))
  end
  return lines
end

--- Show the server's model, adapter, device, training state and queue.
---@param on_result fun(status: table|nil, err: string|nil)|nil
function M.status(on_result)
  lsp.call("shoptalk/status", vim.empty_dict(), function(err, result)
    if err then
      local message = "shoptalk: " .. (err.message or vim.inspect(err))
      vim.notify(message, vim.log.levels.ERROR)
      if on_result then
        on_result(nil, message)
      end
      return
    end
    result = type(result) == "table" and result or {}
    vim.notify("ShopTalk\n" .. table.concat(M.status_lines(result), "\n"), vim.log.levels.INFO)
    if on_result then
      on_result(result, nil)
    end
  end)
end

--- Restart every ShopTalk server (after installing a model, changing Python, ...).
function M.restart()
  local count = lsp.restart()
  if count == 0 then
    -- Nothing was running: start for the current buffer if it qualifies.
    local bufnr = vim.api.nvim_get_current_buf()
    if vim.tbl_contains(config.options.filetypes, vim.bo[bufnr].filetype) then
      lsp.start(bufnr)
    else
      vim.notify(
        "shoptalk: no server was running and this buffer's filetype is not in `filetypes`",
        vim.log.levels.WARN
      )
    end
  end
end

M.accept = ghost.accept
M.accept_word = ghost.accept_word
M.accept_line = ghost.accept_line
M.dismiss = ghost.dismiss
M.visible = ghost.visible

return M
