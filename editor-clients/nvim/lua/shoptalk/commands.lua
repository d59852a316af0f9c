--- ShopTalk's user commands. plugin/shoptalk.lua defines them at startup and
--- setup() again (a plugin manager that adds this folder to 'runtimepath'
--- after startup — lazy.nvim's `config`, see :help shoptalk-install — never
--- sources plugin/).
local M = {}

local function shoptalk()
  return require("shoptalk")
end

function M.define()
  local command = vim.api.nvim_create_user_command
  command("ShopTalkModule", function(args)
    shoptalk().find_module(args.args)
  end, { nargs = "*", desc = "Find the module that does {query} and jump to it" })
  command("ShopTalkStatus", function()
    shoptalk().status()
  end, { desc = "Show ShopTalk's model, device and training state" })
  command("ShopTalkRestart", function()
    shoptalk().restart()
  end, { desc = "Restart the ShopTalk language server" })
  command("ShopTalkToggle", function(args)
    shoptalk().toggle(args.args ~= "" and args.args or nil)
  end, {
    nargs = "?",
    complete = function()
      return { "filetype" }
    end,
    desc = "Turn suggestions off or on (`filetype`: for this buffer's filetype only)",
  })
  command("ShopTalkSnooze", function(args)
    local minutes = args.args == "" and 15 or tonumber(args.args)
    if not minutes or minutes < 0 then
      vim.notify("shoptalk: :ShopTalkSnooze [minutes] (0 ends the snooze)", vim.log.levels.ERROR)
      return
    end
    shoptalk().snooze(minutes)
  end, { nargs = "?", desc = "Pause suggestions for [minutes] (default 15; 0 resumes)" })
end

return M
