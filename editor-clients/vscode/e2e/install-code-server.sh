#!/bin/sh
# Install code-server (a real VS Code, from the npm registry) into $1 without
# network access beyond the registry. Idempotent: does nothing when $1/.installed
# exists.
#
# `npm install -g code-server` does not work offline: its postinstall runs
# `npm install` in lib/vscode, whose lockfile pins @vscode/proxy-agent to a
# GitHub commit (the registry's 0.27.0 tarball has the same integrity hash), and
# @vscode/ripgrep's postinstall downloads rg from GitHub. So: fetch the package,
# point the lock entry at the registry tarball, install with scripts off, put
# Debian's rg where @vscode/ripgrep expects it, then build the native modules
# (node-gyp against the installed Node headers; kerberos needs libkrb5-dev).
set -eu

VERSION=4.96.4   # the last line that runs on Node 20
DEST=${1:?usage: install-code-server.sh DEST}
# Absolute: the steps below change directory.
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
[ -f "$DEST/.installed" ] && exit 0

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" != 20 ]; then
  echo "code-server $VERSION needs Node 20 (found $(node --version))" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "code-server@$VERSION" >/dev/null)
rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
tar -xzf "$work/code-server-$VERSION.tgz" -C "$DEST.partial" --strip-components=1

cd "$DEST.partial/lib/vscode"
sed -i 's#"resolved": "git+ssh://git@github.com/microsoft/vscode-proxy-agent.git\#[0-9a-f]*"#"resolved": "https://registry.npmjs.org/@vscode/proxy-agent/-/proxy-agent-0.27.0.tgz"#' npm-shrinkwrap.json
if grep -q 'git+ssh://' npm-shrinkwrap.json; then
  echo "code-server $VERSION's lockfile still names a git dependency" >&2
  exit 1
fi
npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
mkdir -p node_modules/@vscode/ripgrep/bin
if command -v rg >/dev/null 2>&1; then
  ln -sf "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
fi
npm rebuild --loglevel=error
# What code-server's own postinstall does after installing.
ln -sfn node_modules node_modules.asar
(cd bin/remote-cli && ln -sfn code-linux.sh code-server)
(cd bin/helpers && ln -sfn browser-linux.sh browser.sh)
(cd extensions && npm install --omit=dev --no-audit --no-fund --loglevel=error)

cd "$DEST.partial"
npm install --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error
npm rebuild argon2 --loglevel=error

touch "$DEST.partial/.installed"
rm -rf "$DEST"
mv "$DEST.partial" "$DEST"
echo "code-server $VERSION installed in $DEST"
