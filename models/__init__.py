"""ShopTalk's shared core: model catalog, prompt templates, settings, manifests
and the artifact store. Both halves (`shoptalk.trainer`, `shoptalk.server`)
import from here; nothing here imports torch, transformers, peft or pygls."""
