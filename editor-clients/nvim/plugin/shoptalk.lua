-- ShopTalk's commands; everything else starts in require("shoptalk").setup().
if vim.g.loaded_shoptalk then
  return
end
vim.g.loaded_shoptalk = true

vim.api.nvim_create_user_command("ShopTalkModule", function(args)
  require("shoptalk").find_module(args.args)
end, { nargs = "*", desc = "Find the module that does {query} and jump to it" })

vim.api.nvim_create_user_command("ShopTalkStatus", function()
  require("shoptalk").status()
end, { desc = "Show ShopTalk's model, device and training state" })

vim.api.nvim_create_user_command("ShopTalkRestart", function()
  require("shoptalk").restart()
end, { desc = "Restart the ShopTalk language server" })
