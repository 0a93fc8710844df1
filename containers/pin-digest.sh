#!/usr/bin/env bash
# Re-pin the base image of every containers/*.def by digest: resolves the tag in its
# From: line with skopeo (or crane) and rewrites the line as name:tag@sha256:<digest>.
# Needs a reachable registry; run it when you move to a new base tag, then rebuild.
set -euo pipefail
cd "$(dirname "$0")"
resolve() {
    if command -v skopeo >/dev/null; then
        skopeo inspect --format '{{.Digest}}' "docker://docker.io/library/$1"
    elif command -v crane >/dev/null; then
        crane digest "$1"
    else
        echo "pin-digest.sh: needs skopeo or crane on PATH" >&2
        return 1
    fi
}
for def in *.def; do
    ref=$(sed -n 's/^From: *//p' "$def" | head -n1)
    tag=${ref%@*}
    digest=$(resolve "$tag")
    [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "$def: no digest for $tag (got '$digest')" >&2; exit 1; }
    tmp=$(mktemp "$def.XXXXXX")
    sed "s|^From: .*|From: $tag@$digest|" "$def" > "$tmp" && mv "$tmp" "$def"
    echo "$def: $tag@$digest"
done
