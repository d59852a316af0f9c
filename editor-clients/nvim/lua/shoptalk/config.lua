--- Options of the ShopTalk plugin: the defaults, the user's options merged
--- over them, and what is derived from them (the server command and the
--- initializationOptions the server reads).
local M = {}

---@class shoptalk.Keymaps
---@field accept string|false Accept the whole suggestion.
---@field accept_word string|false Accept the next word of the suggestion.
---@field accept_line string|false Accept the rest of the suggestion's current line.
---@field dismiss string|false Hide the suggestion.
---@field trigger string|false Ask for a suggestion now (also when off or snoozed).

---@class shoptalk.Options
---@field python string|nil Interpreter that has `shoptalk[serve]` installed.
---@field cmd string[]|nil Full server command; overrides `python`.
---@field filetypes string[] Buffers of these filetypes attach the server.
---@field root_markers string[] Files or folders that mark the repository root.
---@field serve table<string, any> `[serve]` settings sent as initializationOptions.
---@field personal { enabled: boolean, identity: string[] } Personal adapter opt-in.
---@field inline "auto"|"native"|"extmark"|"off" How inline suggestions are shown.
---@field enabled boolean Suggestions on at start (`:ShopTalkToggle` flips it).
---@field disabled_filetypes string[] Filetypes with suggestions off (`:ShopTalkToggle filetype`).
---@field hide_with_menu boolean No suggestion while a completion menu is open.
---@field debounce_ms integer Pause after typing before asking (native: at least its own 200 ms).
---@field keymaps shoptalk.Keymaps Insert-mode keys; a key the user already mapped is left alone.
---@field picker "select"|"quickfix" How :ShopTalkModule presents several modules.
---@field module_limit integer How many modules :ShopTalkModule asks for.
---@field health_timeout_ms integer How long :checkhealth waits for the server to start.

---@type shoptalk.Options
M.defaults = {
  python = nil,
  cmd = nil,
  filetypes = {
    "python",
    "lua",
    "javascript",
    "javascriptreact",
    "typescript",
    "typescriptreact",
    "go",
    "java",
    "rust",
    "c",
    "cpp",
    "ruby",
    "sh",
  },
  root_markers = { ".git" },
  serve = {},
  personal = { enabled = false, identity = {} },
  inline = "auto",
  enabled = true,
  disabled_filetypes = {},
  hide_with_menu = true,
  debounce_ms = 150,
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-Down>",
    dismiss = "<C-]>",
    trigger = "<M-\\>",
  },
  picker = "select",
  module_limit = 10,
  health_timeout_ms = 30000,
}

---@type shoptalk.Options
M.options = vim.deepcopy(M.defaults)

local function one_of(values, message)
  return function(v)
    return values[v] == true, message
  end
end

local function list_of_strings(v)
  if type(v) ~= "table" then
    return false
  end
  for _, item in ipairs(v) do
    if type(item) ~= "string" then
      return false
    end
  end
  return true
end

-- One check per option, so that a bad value falls back to its own default only.
local checks = {
  python = function(v)
    return v == nil or type(v) == "string", "expected a path (string)"
  end,
  cmd = function(v)
    return v == nil or (list_of_strings(v) and #v > 0),
      "expected a non-empty list such as { 'shoptalk', 'serve', '--stdio' }"
  end,
  filetypes = function(v)
    return list_of_strings(v), "expected a list of filetypes"
  end,
  root_markers = function(v)
    return list_of_strings(v), "expected a list of file or folder names"
  end,
  serve = function(v)
    return type(v) == "table", "expected a table of [serve] settings"
  end,
  personal = function(v)
    return type(v) == "table"
      and (v.enabled == nil or type(v.enabled) == "boolean")
      and (v.identity == nil or list_of_strings(v.identity)),
      "expected { enabled = true|false, identity = { 'you@example.com' } }"
  end,
  inline = one_of(
    { auto = true, native = true, extmark = true, off = true },
    "expected auto, native, extmark or off"
  ),
  picker = one_of({ select = true, quickfix = true }, "expected select or quickfix"),
  enabled = function(v)
    return type(v) == "boolean", "expected true or false"
  end,
  disabled_filetypes = function(v)
    return list_of_strings(v), "expected a list of filetypes"
  end,
  hide_with_menu = function(v)
    return type(v) == "boolean", "expected true or false"
  end,
  debounce_ms = function(v)
    return type(v) == "number" and v >= 0, "expected a number >= 0"
  end,
  module_limit = function(v)
    return type(v) == "number" and v >= 1, "expected a number >= 1"
  end,
  health_timeout_ms = function(v)
    return type(v) == "number" and v > 0, "expected a number > 0"
  end,
  keymaps = function(v)
    if type(v) ~= "table" then
      return false, "expected a table of keys"
    end
    for name, lhs in pairs(v) do
      if M.defaults.keymaps[name] == nil then
        return false, ("unknown key %q"):format(name)
      end
      if lhs ~= false and type(lhs) ~= "string" then
        return false, ("%s: expected a key such as '<Tab>', or false"):format(name)
      end
    end
    return true
  end,
}

--- Problems with merged options, as { key = message }.
---@param opts table
---@return table<string, string>
function M.validate(opts)
  local problems = {}
  for key, value in pairs(opts) do
    local check = checks[key]
    if not check then
      problems[key] = "unknown option"
    else
      local ok, message = check(value)
      if not ok then
        problems[key] = ("%s (got %s)"):format(message, vim.inspect(value))
      end
    end
  end
  return problems
end

--- Merge `opts` over the defaults. An invalid option falls back to its
--- default and is reported, so a typo never leaves the user without the plugin.
---@param opts table|nil
---@return shoptalk.Options
function M.setup(opts)
  opts = opts or {}
  local merged = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  -- Lists replace, not merge: deep_extend would splice a user's list into ours.
  for _, key in ipairs({ "filetypes", "root_markers", "cmd", "disabled_filetypes" }) do
    if opts[key] ~= nil then
      merged[key] = opts[key]
    end
  end
  local problems = M.validate(merged)
  local lines = {}
  for key, message in pairs(problems) do
    table.insert(lines, ("%s: %s"):format(key, message))
    merged[key] = vim.deepcopy(M.defaults[key])
  end
  if #lines > 0 then
    table.sort(lines)
    vim.notify(
      "shoptalk: invalid options, using the defaults for them:\n  " .. table.concat(lines, "\n  "),
      vim.log.levels.WARN
    )
  end
  M.options = merged
  return merged
end

--- The interpreter to run the server with: the option, else the active
--- virtualenv's, else python3 on PATH.
---@return string|nil path, string how it was found
function M.python()
  local opts = M.options
  if opts.python then
    return vim.fn.expand(opts.python), "option `python`"
  end
  local venv = vim.env.VIRTUAL_ENV
  if venv and vim.fn.executable(venv .. "/bin/python") == 1 then
    return venv .. "/bin/python", "$VIRTUAL_ENV"
  end
  for _, name in ipairs({ "python3", "python" }) do
    local path = vim.fn.exepath(name)
    if path ~= "" then
      return path, "PATH"
    end
  end
  return nil, "not found (set `python` in setup())"
end

--- The command that starts the language server on stdio.
---@return string[]|nil
function M.server_cmd()
  if M.options.cmd then
    return M.options.cmd
  end
  local python = M.python()
  if not python then
    return nil
  end
  return { python, "-m", "shoptalk.models.cli", "serve", "--stdio" }
end

--- initializationOptions (and didChangeConfiguration settings): the `[serve]`
--- keys at the top level plus `personal`, as docs/architecture.md specifies.
---@return table
function M.init_options()
  local options = vim.deepcopy(M.options.serve)
  options.personal = {
    enabled = M.options.personal.enabled == true,
    identity = M.options.personal.identity or {},
  }
  return options
end

--- Which inline-completion path is in use for this Neovim.
---@return "native"|"extmark"|"off"
function M.inline_mode()
  local mode = M.options.inline
  if mode == "auto" then
    return (vim.lsp.inline_completion ~= nil) and "native" or "extmark"
  end
  if mode == "native" and vim.lsp.inline_completion == nil then
    return "extmark"
  end
  return mode
end

return M
