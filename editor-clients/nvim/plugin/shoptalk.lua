-- ShopTalk's commands; everything else starts in require("shoptalk").setup().
if vim.g.loaded_shoptalk then
  return
end
vim.g.loaded_shoptalk = true

require("shoptalk.commands").define()
