#!/usr/bin/env bash
# Patch a Megatron-LM checkout so its pretrain_gpt.py can build megatron-bigmac's MoE layers
# (--moe-structure bigmac|fine_grained|vanilla, --moe-low-rank-ratio, --moe-expert-activation).
#
#   scripts/apply_megatron_lm_patch.sh [--check] [--reverse] MEGATRON_LM_DIR
#
# Reads the checkout's megatron/core/package_info.py, picks patches/megatron-lm/core_rX.Y.0/ for
# its release line, checks every patch with `git apply --check`, and only then applies them.
#   --check    check only; change nothing
#   --reverse  take the patches out again
# Already applied: says so and exits 0. The checkout needs no git history (a release tarball
# works). megatron_bigmac must be importable by the Python that runs pretrain_gpt.py
# (pip install -e <this repository>).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PYTHON=${PYTHON:-python3}
die() { echo "apply_megatron_lm_patch.sh: error: $1" >&2; exit "${2:-2}"; }
say() { echo "apply_megatron_lm_patch.sh: $*"; }

check_only=0; reverse=0; dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --check) check_only=1 ;;
        --reverse|-R) reverse=1 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$dir" ] || die "one MEGATRON_LM_DIR only"; dir=$1 ;;
    esac
    shift
done
[ -n "$dir" ] || die "usage: apply_megatron_lm_patch.sh [--check] [--reverse] MEGATRON_LM_DIR"
[ -d "$dir" ] || die "no such directory: $dir"
dir=$(cd "$dir" && pwd)
info=$dir/megatron/core/package_info.py
[ -f "$dir/pretrain_gpt.py" ] && [ -f "$info" ] \
    || die "$dir is not a Megatron-LM checkout (needs pretrain_gpt.py and megatron/core/package_info.py)"

field() { sed -n "s/^$1 *= *['\"]\{0,1\}\([0-9A-Za-z]*\).*/\1/p" "$info" | head -n1; }
major=$(field MAJOR); minor=$(field MINOR); patch=$(field PATCH)
[ -n "$major" ] && [ -n "$minor" ] || die "cannot read MAJOR/MINOR from $info"
line=core_r$major.$minor.0
patch_dir=$ROOT/patches/megatron-lm/$line
if [ ! -d "$patch_dir" ]; then
    supported=$(cd "$ROOT/patches/megatron-lm" && ls -d core_r* 2>/dev/null | tr '\n' ' ')
    die "no patch set for Megatron-LM $major.$minor.$patch (release line $line); supported: ${supported:-none}"
fi
mapfile -t patches < <(ls "$patch_dir"/*.patch 2>/dev/null | sort)
[ ${#patches[@]} -gt 0 ] || die "$patch_dir holds no .patch files"
say "Megatron-LM $major.$minor.$patch at $dir: ${#patches[@]} patch(es) from patches/megatron-lm/$line"

# Apply relative to the checkout even when it sits inside another git repository.
apply_args=()
if prefix=$(git -C "$dir" rev-parse --show-prefix 2>/dev/null) && [ -n "$prefix" ]; then
    apply_args+=(--directory="${prefix%/}")
    top=$(git -C "$dir" rev-parse --show-toplevel)
else
    top=$dir
fi
gitapply() { (cd "$top" && git apply "${apply_args[@]}" "$@"); }

forward=(); [ "$reverse" = 1 ] && forward=(--reverse)
backward=(); [ "$reverse" = 0 ] && backward=(--reverse)
todo=()
for p in "${patches[@]}"; do
    name=$(basename "$p")
    if gitapply --check "${forward[@]}" "$p" 2>/dev/null; then
        todo+=("$p")
    elif gitapply --check "${backward[@]}" "$p" 2>/dev/null; then
        say "$name: already $([ "$reverse" = 1 ] && echo "out" || echo "applied")"
    else
        echo "--- git apply --check ${forward[*]} $name:" >&2
        gitapply --check "${forward[@]}" "$p" >&2 || true
        if [ "$reverse" = 1 ]; then
            die "$name cannot be taken out of $dir: was pretrain_gpt.py changed after the patch?" 1
        fi
        die "$name does not apply to $dir: is it a clean $line checkout?" 1
    fi
done
if [ "$check_only" = 1 ]; then
    for p in "${todo[@]}"; do say "$(basename "$p"): applies cleanly"; done
    exit 0
fi
for p in "${todo[@]}"; do
    gitapply "${forward[@]}" "$p"
    say "$(basename "$p"): $([ "$reverse" = 1 ] && echo "reversed" || echo "applied")"
done
if [ "$reverse" = 0 ] && ! "$PYTHON" -c "import megatron_bigmac.megatron_lm" >/dev/null 2>&1; then
    say "note: '$PYTHON' cannot import megatron_bigmac yet: pip install -e $ROOT"
fi
