--- Inline suggestions (ghost text) in insert mode.
---
--- On Neovim 0.12+ the native `vim.lsp.inline_completion` shows them; on
--- 0.10–0.11 (or with `inline = "extmark"`) this module asks the server for
--- `textDocument/inlineCompletion` itself, after a pause in typing, and draws
--- the answer with an extmark. Either way the same functions accept the whole
--- suggestion, its next word or its next line, or dismiss it; the switches of
--- `shoptalk.controls` (on/off, snooze, filetype, the file's exclusion) decide
--- whether anything is asked, nothing is shown while a completion menu is
--- open, and `debounce_ms` is the pause on both paths (the native one waits
--- its own 200 ms, and the rest of `debounce_ms` on top).
local config = require("shoptalk.config")
local controls = require("shoptalk.controls")
local lsp = require("shoptalk.lsp")

local M = {}

M.ns = vim.api.nvim_create_namespace("shoptalk.ghost")
local NATIVE_NS = "nvim.lsp.inline_completion"
local NATIVE_DEBOUNCE_MS = 200 -- vim.lsp.inline_completion's own pause
local INLINE_METHOD = "textDocument/inlineCompletion"
local TRIGGER_INVOKED = 1
local TRIGGER_AUTOMATIC = 2
local has_011 = vim.fn.has("nvim-0.11") == 1
local uv = vim.uv or vim.loop

---@class shoptalk.Suggestion
---@field row integer 0-based row of the cursor it was shown at
---@field col integer byte column of that cursor
---@field before string the line up to `col`
---@field after string the line after `col`
---@field text string what accepting inserts at `col`
---@field replace integer bytes after `col` that accepting replaces

---@class shoptalk.BufferState
---@field suggestion shoptalk.Suggestion|nil
---@field timer uv.uv_timer_t|nil
---@field pending { client: vim.lsp.Client, id: integer }|nil
---@field suppressed_tick integer|nil changedtick at a dismiss; no request until it changes
---@field augroup integer|nil

---@type table<integer, shoptalk.BufferState>
local buffers = {}

local function buf_state(bufnr)
  buffers[bufnr] = buffers[bufnr] or {}
  return buffers[bufnr]
end

--- Whether a completion menu is open: the built-in popup menu, nvim-cmp's or blink.cmp's.
function M.menu_visible()
  if vim.fn.pumvisible() == 1 then
    return true
  end
  local cmp = package.loaded["cmp"]
  if type(cmp) == "table" and type(cmp.visible) == "function" and cmp.visible() then
    return true
  end
  local blink = package.loaded["blink.cmp"]
  if type(blink) == "table" then
    for _, name in ipairs({ "is_menu_visible", "is_visible" }) do
      if type(blink[name]) == "function" and blink[name]() then
        return true
      end
    end
  end
  return false
end

local function line_at(bufnr, row)
  return vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
end

local function cursor_of(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  if win == -1 then
    return nil
  end
  local pos = vim.api.nvim_win_get_cursor(win)
  return pos[1] - 1, pos[2], win
end

--- Byte column of an LSP position's character offset in `line`.
local function byte_col(line, character, encoding)
  if encoding == "utf-8" then
    return math.min(character, #line)
  end
  local ok, col
  if has_011 then
    ok, col = pcall(vim.str_byteindex, line, encoding, character, false)
  else
    ok, col = pcall(vim.str_byteindex, line, character, encoding == "utf-16")
  end
  return ok and col or #line
end

--- The plain text of an item's insertText (a string or an LSP StringValue
--- snippet, whose tab stops and placeholders are reduced to their text).
---@param insert_text string|{ kind: string, value: string }
---@return string
function M.plain_text(insert_text)
  if type(insert_text) == "string" then
    return insert_text
  end
  local value = insert_text.value or ""
  value = value:gsub("%${%d+:([^}]*)}", "%1"):gsub("%${%d+}", ""):gsub("%$%d+", "")
  return value
end

--- The next piece of a suggestion for accept-word / accept-line.
---@param text string
---@param kind "word"|"line"
---@return string
function M.next_chunk(text, kind)
  if kind == "line" then
    local first_break = text:find("\n", 1, true)
    if not first_break then
      return text
    end
    if first_break == 1 then
      -- At the end of a line: take the line break and the whole next line.
      local second = text:find("\n", 2, true)
      return second and text:sub(1, second - 1) or text
    end
    return text:sub(1, first_break - 1)
  end
  return text:match("^\n[ \t]*")
    or text:match("^[ \t]*[%w_\128-\255]+")
    or text:match("^[ \t]*[^%w_%s\128-\255]+")
    or text:match("^%s+")
    or text
end

--- Insert `text` at the cursor position of `sug` (replacing `replace` bytes
--- after it) and put the cursor after the inserted text.
local function insert_at(bufnr, win, row, col, text, replace)
  local lines = vim.split(text, "\n", { plain = true })
  local line = line_at(bufnr, row)
  local end_col = math.min(col + (replace or 0), #line)
  vim.api.nvim_buf_set_text(bufnr, row, col, row, end_col, lines)
  local last_row = row + #lines - 1
  local last_col = (#lines == 1 and col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(win, { last_row + 1, last_col })
  return last_row, last_col
end

-- Extmark mode ------------------------------------------------------------

local function render(bufnr, sug)
  vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  local lines = vim.split(sug.text, "\n", { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    table.insert(virt_lines, { { lines[i], "ShopTalkGhost" } })
  end
  vim.api.nvim_buf_set_extmark(bufnr, M.ns, sug.row, sug.col, {
    virt_text = { { lines[1], "ShopTalkGhost" } },
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
end

local function stop_timer(state)
  if state.timer then
    state.timer:stop()
    if not state.timer:is_closing() then
      state.timer:close()
    end
    state.timer = nil
  end
end

local function cancel_pending(state)
  if state.pending then
    pcall(lsp.cancel, state.pending.client, state.pending.id)
    state.pending = nil
  end
end

local function clear(bufnr)
  local state = buf_state(bufnr)
  state.suggestion = nil
  if vim.api.nvim_buf_is_valid(bufnr) then
    vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  end
end

--- Show an item the server answered for the cursor at (row, col).
local function show_item(bufnr, client, item, row, col)
  local text = M.plain_text(item.insertText or "")
  local line = line_at(bufnr, row)
  local replace = 0
  local range = item.range
  if range and range.start.line == row and range["end"].line == row then
    local start_col = byte_col(line, range.start.character, client.offset_encoding)
    local end_col = byte_col(line, range["end"].character, client.offset_encoding)
    if start_col <= col then
      -- The item's text repeats what was typed from the range start; show the rest.
      local typed = line:sub(start_col + 1, col)
      if not vim.startswith(text, typed) then
        return
      end
      text = text:sub(#typed + 1)
    end
    replace = math.max(0, end_col - col)
  end
  if text == "" then
    return
  end
  local state = buf_state(bufnr)
  state.suggestion = {
    row = row,
    col = col,
    before = line:sub(1, col),
    after = line:sub(col + 1),
    text = text,
    replace = replace,
  }
  render(bufnr, state.suggestion)
end

local function request(bufnr, manual)
  local state = buf_state(bufnr)
  local client = lsp.client(bufnr)
  local row, col, win = cursor_of(bufnr)
  if not client or not row or vim.api.nvim_get_mode().mode:sub(1, 1) ~= "i" then
    return
  end
  if not controls.may_request(bufnr, manual) or (not manual and M.menu_visible()) then
    return
  end
  cancel_pending(state)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = manual and TRIGGER_INVOKED or TRIGGER_AUTOMATIC }
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local request_id
  local ok
  ok, request_id = lsp.request(client, "textDocument/inlineCompletion", params, function(err, result)
    if state.pending and state.pending.id == request_id then
      state.pending = nil
    end
    if err or not result or not vim.api.nvim_buf_is_valid(bufnr) then
      return
    end
    -- A stale answer (the user typed or moved on meanwhile) is dropped.
    local now_row, now_col = cursor_of(bufnr)
    if
      vim.api.nvim_buf_get_changedtick(bufnr) ~= tick
      or now_row ~= row
      or now_col ~= col
      or vim.api.nvim_get_mode().mode:sub(1, 1) ~= "i"
    then
      return
    end
    local items = result.items or result
    if type(items) == "table" and items[1] and not M.menu_visible() then
      show_item(bufnr, client, items[1], row, col)
    end
  end, bufnr)
  if ok and request_id then
    state.pending = { client = client, id = request_id }
  end
end

local function schedule_request(bufnr)
  local state = buf_state(bufnr)
  if state.suppressed_tick == vim.api.nvim_buf_get_changedtick(bufnr) then
    return
  end
  state.suppressed_tick = nil
  stop_timer(state)
  local timer = uv.new_timer()
  state.timer = timer
  timer:start(
    config.options.debounce_ms,
    0,
    vim.schedule_wrap(function()
      if state.timer == timer then
        stop_timer(state)
        if vim.api.nvim_buf_is_valid(bufnr) then
          request(bufnr)
        end
      end
    end)
  )
end

--- After typing or moving: keep the suggestion when the user typed exactly
--- what it shows (type-through), else drop it and ask again after a pause.
local function on_change(bufnr)
  local state = buf_state(bufnr)
  local sug = state.suggestion
  if sug then
    local row, col = cursor_of(bufnr)
    local line = row and line_at(bufnr, row) or ""
    if
      row == sug.row
      and col >= sug.col
      and line:sub(1, sug.col) == sug.before
      and line:sub(col + 1) == sug.after
    then
      local typed = line:sub(sug.col + 1, col)
      if typed == "" then
        return
      end
      if vim.startswith(sug.text, typed) and #typed < #sug.text then
        sug.text = sug.text:sub(#typed + 1)
        sug.col = col
        sug.before = line:sub(1, col)
        render(bufnr, sug)
        return
      end
    end
    clear(bufnr)
  end
  schedule_request(bufnr)
end

local function extmark_attach(bufnr)
  local state = buf_state(bufnr)
  if state.augroup then
    return
  end
  state.augroup = vim.api.nvim_create_augroup("shoptalk.ghost." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ "TextChangedI", "CursorMovedI" }, {
    group = state.augroup,
    buffer = bufnr,
    callback = function()
      on_change(bufnr)
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = state.augroup,
    buffer = bufnr,
    callback = function()
      stop_timer(state)
      cancel_pending(state)
      clear(bufnr)
    end,
  })
end

-- Native mode: the switches and the debounce at the client ------------------

---@type table<integer, boolean> buffers whose next request is a manual trigger
local manual_next = {}
---@type table<integer, uv.uv_timer_t>
local native_pending = {}

local function stop_native_pending(bufnr)
  local timer = native_pending[bufnr]
  native_pending[bufnr] = nil
  if timer and not timer:is_closing() then
    timer:stop()
    timer:close()
  end
end

--- The native completor asks `client:request` itself: wrap it once per client
--- so that the switches, the open menu and `debounce_ms` apply to its
--- requests (a manual trigger goes at once).
---@param client vim.lsp.Client
local function wrap_native_requests(client)
  if rawget(client, "_shoptalk_native") then
    return
  end
  rawset(client, "_shoptalk_native", true)
  local original = client.request
  client.request = function(self, method, params, handler, bufnr)
    if method ~= INLINE_METHOD then
      return original(self, method, params, handler, bufnr)
    end
    local uri = params and params.textDocument and params.textDocument.uri
    local buf = bufnr or (uri and vim.uri_to_bufnr(uri)) or vim.api.nvim_get_current_buf()
    local manual = manual_next[buf] == true
    manual_next[buf] = nil
    if not controls.may_request(buf, manual) or (not manual and M.menu_visible()) then
      return false, nil
    end
    local extra = manual and 0 or math.max(0, config.options.debounce_ms - NATIVE_DEBOUNCE_MS)
    stop_native_pending(buf)
    if extra == 0 then
      return original(self, method, params, handler, bufnr)
    end
    local tick = vim.api.nvim_buf_get_changedtick(buf)
    local cursor = vim.api.nvim_win_get_cursor(0)
    native_pending[buf] = vim.defer_fn(function()
      native_pending[buf] = nil
      local now = vim.api.nvim_win_get_cursor(0)
      if
        vim.api.nvim_buf_is_valid(buf)
        and vim.api.nvim_buf_get_changedtick(buf) == tick
        and now[1] == cursor[1]
        and now[2] == cursor[2]
        and vim.api.nvim_get_mode().mode:sub(1, 1) == "i"
      then
        original(self, method, params, handler, bufnr)
      end
    end, extra)
    return true, nil
  end
end

--- Forget what the native completor shows and holds (its current item comes
--- back on the next cursor move otherwise).
local function reset_native(bufnr)
  stop_native_pending(bufnr)
  if vim.lsp.inline_completion and vim.api.nvim_buf_is_valid(bufnr) then
    pcall(vim.lsp.inline_completion.enable, false, { bufnr = bufnr })
    pcall(vim.lsp.inline_completion.enable, true, { bufnr = bufnr })
  end
end

--- Hide what is shown in a buffer (a menu opened, a switch went off).
---@param bufnr integer
function M.hide(bufnr)
  if not vim.api.nvim_buf_is_valid(bufnr) then
    return
  end
  if config.inline_mode() == "native" then
    reset_native(bufnr)
    return
  end
  local state = buffers[bufnr]
  if state then
    stop_timer(state)
    cancel_pending(state)
  end
  clear(bufnr)
end

--- After a switch changed: hide the suggestion of every buffer that may no
--- longer have one.
function M.apply_controls()
  for bufnr in pairs(buffers) do
    if not controls.may_request(bufnr, false) then
      M.hide(bufnr)
    end
  end
end

local menu_group = nil

--- Hide suggestions while a completion menu is open (the built-in one,
--- nvim-cmp's, blink.cmp's); they come back with the next keystroke after it.
local function watch_menus()
  if menu_group then
    return
  end
  menu_group = vim.api.nvim_create_augroup("shoptalk.menu", { clear = true })
  local function hide_current()
    local bufnr = vim.api.nvim_get_current_buf()
    if buffers[bufnr] then
      M.hide(bufnr)
    end
  end
  vim.api.nvim_create_autocmd("CompleteChanged", { group = menu_group, callback = hide_current })
  vim.api.nvim_create_autocmd("User", {
    group = menu_group,
    pattern = { "BlinkCmpMenuOpen", "BlinkCmpShow" },
    callback = hide_current,
  })
  local cmp = package.loaded["cmp"]
  if type(cmp) == "table" and type(cmp.event) == "table" and cmp.event.on then
    pcall(cmp.event.on, cmp.event, "menu_opened", hide_current)
  end
end

local function extmark_accept(bufnr, kind)
  local state = buf_state(bufnr)
  local sug = state.suggestion
  local row, col, win = cursor_of(bufnr)
  if not sug or row ~= sug.row or col ~= sug.col then
    return false
  end
  vim.schedule(function()
    if state.suggestion ~= sug or not vim.api.nvim_win_is_valid(win) then
      return
    end
    local chunk = kind == "all" and sug.text or M.next_chunk(sug.text, kind)
    local rest = sug.text:sub(#chunk + 1)
    local new_row, new_col =
      insert_at(bufnr, win, sug.row, sug.col, chunk, rest == "" and sug.replace or 0)
    if rest == "" then
      -- Nothing left to show: the edit's TextChangedI asks for what comes next.
      clear(bufnr)
      return
    end
    local line = line_at(bufnr, new_row)
    state.suggestion = {
      row = new_row,
      col = new_col,
      before = line:sub(1, new_col),
      after = line:sub(new_col + 1),
      text = rest,
      replace = sug.replace,
    }
    render(bufnr, state.suggestion)
  end)
  return true
end

-- Native mode (vim.lsp.inline_completion) ---------------------------------

local function native_text(bufnr)
  local ns = vim.api.nvim_get_namespaces()[NATIVE_NS]
  if not ns then
    return nil
  end
  local marks = vim.api.nvim_buf_get_extmarks(bufnr, ns, 0, -1, { details = true })
  if #marks == 0 then
    return nil
  end
  local details = marks[1][4]
  local parts = {}
  local first = {}
  for _, chunk in ipairs(details.virt_text or {}) do
    if chunk[2] ~= "ComplHintMore" then
      table.insert(first, chunk[1])
    end
  end
  table.insert(parts, table.concat(first))
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local text = {}
    for _, chunk in ipairs(virt_line) do
      if chunk[2] ~= "ComplHintMore" then
        table.insert(text, chunk[1])
      end
    end
    table.insert(parts, table.concat(text))
  end
  return table.concat(parts, "\n")
end

--- Insert the next word/line of a native item at the cursor; the native
--- completor asks again for the rest as the cursor moves.
local function native_partial(bufnr, item, kind)
  local row, col, win = cursor_of(bufnr)
  if not row then
    return
  end
  local text = M.plain_text(item.insert_text)
  local line = line_at(bufnr, row)
  if item.range then
    local start_row, start_col = item.range.start:to_extmark()
    if start_row == row and start_col <= col then
      local typed = line:sub(start_col + 1, col)
      if not vim.startswith(text, typed) then
        return
      end
      text = text:sub(#typed + 1)
    end
  end
  if text ~= "" then
    insert_at(bufnr, win, row, col, M.next_chunk(text, kind), 0)
  end
end

-- Public API ----------------------------------------------------------------

--- Start showing suggestions in a buffer the server attached to.
---@param bufnr integer
---@param client vim.lsp.Client
function M.attach(bufnr, client)
  local mode = config.inline_mode()
  buf_state(bufnr)
  if config.options.hide_with_menu then
    watch_menus()
  end
  if mode == "native" then
    wrap_native_requests(client)
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  elseif mode == "extmark" then
    extmark_attach(bufnr)
  end
end

--- Stop showing suggestions in a buffer.
---@param bufnr integer
function M.detach(bufnr)
  stop_native_pending(bufnr)
  manual_next[bufnr] = nil
  local state = buffers[bufnr]
  if state then
    stop_timer(state)
    cancel_pending(state)
    if state.augroup then
      pcall(vim.api.nvim_del_augroup_by_id, state.augroup)
    end
    clear(bufnr)
    buffers[bufnr] = nil
  end
  if vim.lsp.inline_completion and vim.api.nvim_buf_is_valid(bufnr) then
    pcall(vim.lsp.inline_completion.enable, false, { bufnr = bufnr })
  end
end

--- The suggestion shown in a buffer now (nil when none), in either mode.
---@param bufnr integer|nil
---@return string|nil
function M.visible(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if config.inline_mode() == "native" then
    return native_text(bufnr)
  end
  local state = buffers[bufnr]
  return state and state.suggestion and state.suggestion.text or nil
end

--- Accept the whole suggestion. Returns false when none is shown (so a
--- mapping can fall back to the key's own meaning).
---@param bufnr integer|nil
---@return boolean
function M.accept(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if M.menu_visible() then
    return false -- the menu's key: <Tab> selects in the menu
  end
  if config.inline_mode() == "native" then
    return vim.lsp.inline_completion.get({ bufnr = bufnr })
  end
  return extmark_accept(bufnr, "all")
end

--- Accept the suggestion's next word.
---@param bufnr integer|nil
---@return boolean
function M.accept_word(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if M.menu_visible() then
    return false
  end
  if config.inline_mode() == "native" then
    return vim.lsp.inline_completion.get({
      bufnr = bufnr,
      on_accept = function(item)
        native_partial(bufnr, item, "word")
      end,
    })
  end
  return extmark_accept(bufnr, "word")
end

--- Accept the rest of the suggestion's current line.
---@param bufnr integer|nil
---@return boolean
function M.accept_line(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if M.menu_visible() then
    return false
  end
  if config.inline_mode() == "native" then
    return vim.lsp.inline_completion.get({
      bufnr = bufnr,
      on_accept = function(item)
        native_partial(bufnr, item, "line")
      end,
    })
  end
  return extmark_accept(bufnr, "line")
end

--- Hide the suggestion until the text changes.
---@param bufnr integer|nil
---@return boolean
function M.dismiss(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if config.inline_mode() == "native" then
    return vim.lsp.inline_completion.get({ bufnr = bufnr, on_accept = function() end })
  end
  local state = buf_state(bufnr)
  if not state.suggestion then
    return false
  end
  stop_timer(state)
  cancel_pending(state)
  state.suppressed_tick = vim.api.nvim_buf_get_changedtick(bufnr)
  -- Scheduled: an <expr> mapping may not touch the buffer.
  vim.schedule(function()
    clear(bufnr)
  end)
  return true
end

--- Ask for a suggestion now (`<Plug>(shoptalk-trigger)`), without waiting
--- for a pause in typing; also when suggestions are off or snoozed, never
--- for an excluded file. Returns true (the key is used).
---@param bufnr integer|nil
---@return boolean
function M.trigger(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  if config.inline_mode() == "native" then
    -- The native completor asks on cursor movement; nudge it the same way,
    -- marked manual so that the switches and the extra pause let it through.
    manual_next[bufnr] = true
    vim.api.nvim_exec_autocmds("CursorMovedI", { buffer = bufnr })
    return true
  end
  buf_state(bufnr).suppressed_tick = nil
  vim.schedule(function()
    request(bufnr, true)
  end)
  return true
end

return M
