"""The language server: completions and module lookup from the local model, and the watcher."""
