--- Whether ShopTalk suggests in a buffer: the global switch (`:ShopTalkToggle`,
--- option `enabled`), a snooze (`:ShopTalkSnooze`), filetypes turned off
--- (`:ShopTalkToggle filetype`, option `disabled_filetypes`), and the server's
--- exclusion of the file (never-send files such as `.env*`, keys and
--- certificates, `.shoptalkignore`; asked with `shoptalk/exclusion` when the
--- server attaches). A manual trigger (`<Plug>(shoptalk-trigger)`) still asks
--- when suggestions are off or snoozed; an excluded file never gets a request.
local M = {}

---@class shoptalk.ControlState
---@field enabled boolean
---@field snoozed_until integer|nil os.time() when the snooze ends
---@field filetypes_off table<string, boolean>
local state = { enabled = true, snoozed_until = nil, filetypes_off = {} }

---@type table<integer, { reason: string, message: string }|false>
local excluded = {}

--- Listeners told when a switch changes (ghost.lua re-applies each buffer).
local listeners = {}

local function changed()
  for _, listener in ipairs(listeners) do
    listener()
  end
  pcall(vim.cmd.redrawstatus)
end

---@param fn fun()
function M.on_change(fn)
  table.insert(listeners, fn)
end

--- Apply the options' initial switches (setup()).
---@param opts shoptalk.Options
function M.setup(opts)
  state.enabled = opts.enabled ~= false
  state.filetypes_off = {}
  for _, ft in ipairs(opts.disabled_filetypes or {}) do
    state.filetypes_off[ft] = true
  end
end

--- Turn suggestions on or off everywhere (nil flips them); ends a snooze.
---@param on boolean|nil
function M.toggle(on)
  if on == nil then
    on = not (state.enabled and not M.snoozed())
  end
  state.enabled = on
  state.snoozed_until = nil
  changed()
  return on
end

--- Pause suggestions for `minutes` (0 ends the snooze).
---@param minutes number
function M.snooze(minutes)
  state.snoozed_until = minutes > 0 and (os.time() + math.floor(minutes * 60)) or nil
  changed()
end

--- Seconds left of the snooze, or nil.
---@return integer|nil
function M.snoozed()
  if state.snoozed_until and state.snoozed_until > os.time() then
    return state.snoozed_until - os.time()
  end
  state.snoozed_until = nil
  return nil
end

--- Turn suggestions on or off for a filetype (nil flips it).
---@param ft string
---@param on boolean|nil
function M.toggle_filetype(ft, on)
  if on == nil then
    on = state.filetypes_off[ft] == true
  end
  state.filetypes_off[ft] = (not on) or nil
  changed()
  return on
end

--- Record the server's `shoptalk/exclusion` answer for a buffer.
---@param bufnr integer
---@param answer table|nil
function M.set_exclusion(bufnr, answer)
  if type(answer) == "table" and answer.excluded == true then
    local reason = type(answer.reason) == "string" and answer.reason or "excluded"
    local message = type(answer.message) == "string" and answer.message or reason
    excluded[bufnr] = { reason = reason, message = message }
  else
    excluded[bufnr] = false
  end
  changed()
end

---@param bufnr integer
function M.forget(bufnr)
  excluded[bufnr] = nil
end

---@param bufnr integer
---@return { reason: string, message: string }|nil
function M.exclusion(bufnr)
  return excluded[bufnr] or nil
end

--- Why a buffer gets no suggestions, or nil when it does:
--- { kind = "excluded"|"off"|"snoozed"|"filetype", text = "..." }.
---@param bufnr integer
---@return { kind: string, text: string }|nil
function M.off_reason(bufnr)
  local exclusion = excluded[bufnr]
  if exclusion then
    return { kind = "excluded", text = "off for this file (" .. exclusion.message .. ")" }
  end
  if not state.enabled then
    return { kind = "off", text = "off" }
  end
  local left = M.snoozed()
  if left then
    return { kind = "snoozed", text = ("snoozed (%d min)"):format(math.max(1, math.ceil(left / 60))) }
  end
  local ft = vim.api.nvim_buf_is_valid(bufnr) and vim.bo[bufnr].filetype or ""
  if state.filetypes_off[ft] then
    return { kind = "filetype", text = "off for " .. ft }
  end
  return nil
end

--- Whether to ask the server for a buffer: never for an excluded file;
--- when a switch is off, only on a manual trigger.
---@param bufnr integer
---@param manual boolean|nil
---@return boolean
function M.may_request(bufnr, manual)
  local off = M.off_reason(bufnr)
  if not off then
    return true
  end
  return manual == true and off.kind ~= "excluded"
end

return M
