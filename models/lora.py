"""Run-time LoRA adapters on a loaded llama.cpp model: apply, replace or
remove a GGUF LoRA (written by `shoptalk export --adapter-only`) without
reloading the base weights.

A thin layer over llama-cpp-python's low-level adapter API
(`llama_adapter_lora_init`, `llama_set_adapters_lora`). llama.cpp applies the
adapter while computing, so the base weights stay untouched and removing the
adapter gives the base's outputs back exactly. Every swap clears the KV cache:
cached keys/values were computed with the previous weights.

Adapters belong to the model: llama.cpp frees them together with it, so a
`LoraAdapters` must not outlive its `Llama` (call `unload` to free one early).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoptalk.models.errors import ShopTalkError

if TYPE_CHECKING:
    import llama_cpp

log = logging.getLogger(__name__)


class AdapterError(ShopTalkError):
    pass


@dataclass
class LoraAdapters:
    """The GGUF LoRA adapters loaded for one `llama_cpp.Llama`, and the one
    applied now (at most one: ShopTalk serves one tuned model at a time)."""

    llm: llama_cpp.Llama
    _loaded: dict[Path, Any] = field(default_factory=dict)
    _active: Path | None = None
    _scale: float = 1.0

    @property
    def active(self) -> Path | None:
        """The applied adapter file, None when serving the plain base."""
        return self._active

    @property
    def scale(self) -> float:
        return self._scale

    def load(self, path: Path) -> None:
        """Read an adapter into memory (once) without applying it."""
        import llama_cpp

        key = path.resolve()
        if key in self._loaded:
            return
        if not key.is_file():
            raise AdapterError(
                f"LoRA adapter {path} does not exist; export it with `shoptalk export --adapter-only`"
            )
        adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, str(key).encode("utf-8"))
        if not adapter:
            raise AdapterError(
                f"llama.cpp could not load {path} as a LoRA adapter for this model: it is damaged, "
                "not an adapter, or made for another base; export it again from a run of this base"
            )
        self._loaded[key] = adapter

    def apply(self, path: Path, scale: float = 1.0) -> None:
        """Serve with this adapter (replacing any other); clears the KV cache."""
        self.load(path)
        key = path.resolve()
        if key == self._active and scale == self._scale:
            return
        self._set([self._loaded[key]], [scale])
        self._active, self._scale = key, scale
        log.info("LoRA adapter %s applied (scale %.2f)", key.name, scale)

    def remove(self) -> None:
        """Serve the plain base again; clears the KV cache."""
        if self._active is None:
            return
        self._set([], [])
        log.info("LoRA adapter %s removed", self._active.name)
        self._active = None

    def unload(self, path: Path) -> None:
        """Free a loaded adapter's memory (removing it first if applied)."""
        import llama_cpp

        key = path.resolve()
        if key == self._active:
            self.remove()
        adapter = self._loaded.pop(key, None)
        if adapter is not None:
            llama_cpp.llama_adapter_lora_free(adapter)

    def _set(self, adapters: list[Any], scales: list[float]) -> None:
        import llama_cpp

        count = len(adapters)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*adapters) if count else None
        factors = (ctypes.c_float * count)(*scales) if count else None
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, array, count, factors) != 0:
            raise AdapterError("llama.cpp refused to set the LoRA adapter on this context")
        reset_kv_cache(self.llm)


def reset_kv_cache(llm: llama_cpp.Llama) -> None:
    """Forget every cached token so the next evaluation starts from scratch."""
    import llama_cpp

    memory = llama_cpp.llama_get_memory(llm.ctx)
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)
    llm.reset()
