--- :checkhealth shoptalk — is everything there for completions to work?
--- Python found, `shoptalk` importable with its serve extra, the model the
--- server would load present and verified, and the server starting and
--- answering `initialize` for real.
local config = require("shoptalk.config")
local lsp = require("shoptalk.lsp")

local M = {}

local health = vim.health

-- Runs in the configured interpreter; prints one JSON object. Keys:
-- shoptalk (version or error), serve_deps (missing names), model (what the
-- server would load for the repository and whether it verified).
local PROBE = [[
import json, sys
from pathlib import Path

out = {}
try:
    from importlib.metadata import version
    import shoptalk.models.cli  # noqa: F401
    import shoptalk.server  # noqa: F401
    out["shoptalk"] = version("shoptalk")
except Exception as exc:
    out["shoptalk_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    sys.exit(0)

import importlib.util
out["serve_missing"] = [m for m in ("pygls", "lsprotocol", "llama_cpp") if importlib.util.find_spec(m) is None]

try:
    from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, resolve_base
    from shoptalk.models.provision import base_paths, gguf_status
    from shoptalk.models.settings import load_settings
    from shoptalk.models.store import RepoStore
    from shoptalk.models.registry import promoted_choice

    repo = Path(sys.argv[1])
    settings = load_settings(repo=repo)
    data_dir = settings.resolved_data_dir()
    serve = settings.serve
    if serve.backend == "openai":
        out["model"] = {
            "ok": bool(serve.openai_url),
            "description": f"OpenAI-compatible backend at {serve.openai_url}",
            "error": "serve.backend is openai but serve.openai_url is not set",
            "advice": "Set openai_url in setup({ serve = { ... } }) or shoptalk.toml",
        }
    else:
        record = RepoStore.for_repo(data_dir, repo).current()
        if record is not None:
            try:
                choice = promoted_choice(record, settings, data_dir)
                extra = f" + adapter {choice.adapter}" if choice.adapter else ""
                out["model"] = {
                    "ok": True,
                    "description": f"promoted model {choice.run_id or ''} verified: {choice.model}{extra}",
                }
            except Exception as exc:
                out["model"] = {
                    "ok": False,
                    "error": f"the promoted model cannot be used ({exc}); the server falls back to the base model",
                    "advice": f"Roll back with `shoptalk models rollback --repo {repo}`, or export the run again",
                }
        else:
            try:
                base = resolve_base(settings.train.base)
            except Exception:
                base = CATALOG[DEFAULT_BASE]
            if not base.package:
                base = CATALOG[DEFAULT_BASE]
            path = base_paths(data_dir, base).gguf
            status = gguf_status(data_dir, base)
            note = "no promoted model for this repository yet; "
            if status == "verified":
                out["model"] = {"ok": True, "description": f"{note}the base {base.key} is verified: {path}"}
            elif status == "missing" and importlib.util.find_spec(base.package) is not None:
                out["model"] = {
                    "ok": True,
                    "level": "warn",
                    "description": f"{note}the base {base.key} is assembled from its package on the first start",
                    "advice": "Run `shoptalk models pull --gguf-only` once to do it now",
                }
            else:
                out["model"] = {
                    "ok": False,
                    "error": f"{note}the base {base.key} at {path} is {status}",
                    "advice": "Run `shoptalk models pull --gguf-only`",
                }
except Exception as exc:
    out["model"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
]]

--- Run the probe; returns the decoded object or nil and an error message.
---@param python string
---@param root string
---@return table|nil, string|nil
function M.probe(python, root)
  local ok, proc = pcall(vim.system, { python, "-c", PROBE, root }, { text = true })
  if not ok then
    return nil, tostring(proc)
  end
  local result = proc:wait(config.options.health_timeout_ms)
  if result.code ~= 0 then
    local stderr = vim.trim(result.stderr or "")
    return nil,
      ("%s exited with code %d%s"):format(
        python,
        result.code,
        stderr ~= "" and (": " .. stderr:sub(-600)) or ""
      )
  end
  local decoded_ok, decoded = pcall(vim.json.decode, vim.trim(result.stdout or ""))
  if not decoded_ok or type(decoded) ~= "table" then
    return nil, "unexpected output from " .. python .. ": " .. (result.stdout or "")
  end
  return decoded, nil
end

local function frame(message)
  local body = vim.json.encode(message)
  return ("Content-Length: %d\r\n\r\n%s"):format(#body, body)
end

--- Messages complete so far in a buffer of LSP output.
local function messages_in(buffer)
  local messages = {}
  local position = 1
  while true do
    local header_end = buffer:find("\r\n\r\n", position, true)
    if not header_end then
      break
    end
    local length = tonumber(buffer:sub(position, header_end):match("Content%-Length: (%d+)"))
    if not length or #buffer < header_end + 3 + length then
      break
    end
    local body = buffer:sub(header_end + 4, header_end + 3 + length)
    local ok, decoded = pcall(vim.json.decode, body)
    if ok then
      table.insert(messages, decoded)
    end
    position = header_end + 4 + length
  end
  return messages
end

--- Start the server with `cmd`, send `initialize`, wait until the model is
--- loaded (shoptalk/status), shut it down. Returns the InitializeResult and
--- the last status, or nil, an error and stderr's tail.
---@param cmd string[]
---@param root string
---@param timeout_ms integer
---@return { init: table, status: table|nil }|nil result, string|nil error, string stderr_tail, number seconds
function M.start_server(cmd, root, timeout_ms)
  local stdout, stderr, exited = "", "", nil
  local started = vim.uv.hrtime()
  local ok, proc = pcall(vim.system, cmd, {
    cwd = root,
    stdin = true,
    stdout = function(_, data)
      stdout = stdout .. (data or "")
    end,
    stderr = function(_, data)
      stderr = stderr .. (data or "")
    end,
  }, function(result)
    exited = result.code
  end)
  if not ok then
    return nil, tostring(proc), "", 0
  end
  local deadline = vim.uv.now() + timeout_ms
  local next_id = 0
  --- Send a request and wait for its answer: (result, error) or nil when
  --- the server exited or the deadline passed.
  local function call(method, params)
    next_id = next_id + 1
    local id = next_id
    proc:write(frame({ jsonrpc = "2.0", id = id, method = method, params = params }))
    local answer
    vim.wait(math.max(0, deadline - vim.uv.now()), function()
      for _, message in ipairs(messages_in(stdout)) do
        if message.id == id and message.method == nil then
          answer = message
          return true
        end
      end
      return exited ~= nil
    end, 50)
    return answer
  end
  local function finish()
    if exited == nil then
      deadline = vim.uv.now() + 3000
      call("shutdown", vim.NIL)
      proc:write(frame({ jsonrpc = "2.0", method = "exit" }))
      vim.wait(2000, function()
        return exited ~= nil
      end, 50)
    end
    if exited == nil then
      proc:kill(15)
    end
    local tail = table.concat(vim.list_slice(vim.split(vim.trim(stderr), "\n"), -8), "\n")
    return tail, (vim.uv.hrtime() - started) / 1e9
  end

  local init = call("initialize", {
    processId = vim.uv.os_getpid(),
    rootUri = vim.uri_from_fname(root),
    workspaceFolders = { { uri = vim.uri_from_fname(root), name = vim.fs.basename(root) } },
    capabilities = vim.lsp.protocol.make_client_capabilities(),
    initializationOptions = config.init_options(),
    clientInfo = { name = "shoptalk-checkhealth" },
  })
  if not init or init.error then
    local tail, seconds = finish()
    if init and init.error then
      return nil, "initialize failed: " .. (init.error.message or vim.inspect(init.error)), tail, seconds
    end
    if exited ~= nil then
      return nil, ("the server exited with code %d before answering"):format(exited), tail, seconds
    end
    return nil, ("no answer to initialize within %.0f s"):format(timeout_ms / 1000), tail, seconds
  end
  proc:write(frame({ jsonrpc = "2.0", method = "initialized", params = vim.empty_dict() }))
  -- The model loads in the background after initialize; wait for it.
  local status
  while vim.uv.now() < deadline and exited == nil do
    local answer = call("shoptalk/status", vim.empty_dict())
    status = answer and answer.result
    if type(status) ~= "table" or status.loading ~= true then
      break
    end
    vim.wait(300)
  end
  local tail, seconds = finish()
  return { init = init.result or {}, status = type(status) == "table" and status or nil },
    nil,
    tail,
    seconds
end

local function check_neovim()
  health.start("Neovim")
  if vim.fn.has("nvim-0.10") ~= 1 then
    health.error("Neovim 0.10 or newer is needed (inline virtual text, vim.system, vim.fs.root)")
    return false
  end
  local mode = config.inline_mode()
  local descriptions = {
    native = "suggestions through Neovim's native vim.lsp.inline_completion",
    extmark = "suggestions through ShopTalk's ghost text (extmarks)",
    off = "inline suggestions are off (option `inline`)",
  }
  health.ok(("Neovim %s: %s"):format(tostring(vim.version()), descriptions[mode]))
  return true
end

local function check_python()
  health.start("Python")
  if config.options.cmd then
    local program = config.options.cmd[1]
    if vim.fn.executable(program) ~= 1 then
      health.error(("server command %q is not executable"):format(program), {
        "Fix `cmd` in require('shoptalk').setup{}, or remove it and set `python`",
      })
      return nil
    end
    health.ok("server command (option `cmd`): " .. table.concat(config.options.cmd, " "))
  end
  local python, how = config.python()
  if not python then
    health.error("no Python interpreter found", {
      "Set `python` in require('shoptalk').setup{} to the interpreter you installed "
        .. "shoptalk into (e.g. ~/.venvs/shoptalk/bin/python)",
    })
    return nil
  end
  if vim.fn.executable(python) ~= 1 then
    health.error(("Python %s (%s) is not executable"):format(python, how), {
      "Set `python` in require('shoptalk').setup{} to an existing interpreter",
    })
    return nil
  end
  health.ok(("Python: %s (%s)"):format(python, how))
  return python
end

local function check_package(python, probe)
  health.start("shoptalk package")
  if probe.shoptalk_error then
    health.error(
      ("`shoptalk` is not importable in %s: %s"):format(python, probe.shoptalk_error),
      { ("Install it: %s -m pip install 'shoptalk[serve]'"):format(python) }
    )
    return false
  end
  health.ok("shoptalk " .. probe.shoptalk)
  local missing = probe.serve_missing or {}
  if #missing > 0 then
    health.error("the serve extra is incomplete; missing: " .. table.concat(missing, ", "), {
      ("Install it: %s -m pip install 'shoptalk[serve]'"):format(python),
    })
    return false
  end
  health.ok("serve extra installed (pygls, lsprotocol, llama_cpp)")
  return true
end

local function check_model(probe, root)
  health.start("Model")
  local model = probe.model or {}
  if model.ok then
    local message = ("%s (for %s)"):format(model.description or "model verified", root)
    if model.level == "warn" then
      health.warn(message, model.advice and { model.advice } or nil)
    else
      health.ok(message)
    end
    return true
  end
  health.error(model.error or "no model information", model.advice and { model.advice } or nil)
  return false
end

local function check_server(root)
  health.start("Language server")
  local cmd = config.server_cmd()
  if not cmd then
    health.error("no server command (see Python above)")
    return
  end
  local result, err, tail, seconds =
    M.start_server(cmd, root, config.options.health_timeout_ms)
  if not result then
    local advice = { "Run it by hand to see why: " .. table.concat(cmd, " ") }
    if tail ~= "" then
      table.insert(advice, 1, "Its last log lines:\n" .. tail)
    end
    health.error(("`%s` did not start: %s"):format(table.concat(cmd, " "), err), advice)
    return
  end
  local info = result.init.serverInfo or {}
  health.ok(("%s %s started"):format(info.name or "server", info.version or ""))
  local capabilities = result.init.capabilities or {}
  if capabilities.inlineCompletionProvider then
    health.ok("inline completion offered")
  else
    health.warn("the server does not offer textDocument/inlineCompletion")
  end
  local status = result.status
  if not status then
    health.warn("the server did not answer shoptalk/status")
  elseif status.loading == true then
    health.warn(("the model was still loading after %.0f s"):format(seconds))
  elseif status.model == nil or status.model == vim.NIL then
    local reason = (status.error ~= nil and status.error ~= vim.NIL) and status.error or "unknown"
    health.error("the server loaded no model: " .. reason, { "Its last log lines:\n" .. tail })
  else
    local device = (status.device ~= nil and status.device ~= vim.NIL) and status.device or "?"
    health.ok(
      ("model loaded in %.1f s: %s on %s"):format(seconds, vim.fs.basename(tostring(status.model)), device)
    )
  end
end

function M.check()
  local root = lsp.root_dir(vim.api.nvim_get_current_buf())
  if not check_neovim() then
    return
  end
  local python = check_python()
  if not python then
    return
  end
  local probe, err = M.probe(python, root)
  if not probe then
    health.start("shoptalk package")
    health.error("could not run " .. python .. ": " .. err)
    return
  end
  if not check_package(python, probe) then
    return
  end
  check_model(probe, root)
  -- The server starts even when the promoted model is unusable (it serves the base).
  check_server(root)
end

return M
