#!/usr/bin/env bash
# The quality experiment of issue #8 in one call: tokenize the enwiki shards, train Vanilla,
# Fine-Grained and BigMac one after another on the same data, seed and schedule, evaluate each
# final checkpoint on WikiText-2 test, write the comparison report and pack what should come back.
#
#   scripts/quality_experiment.sh DATA_DIR WORK_DIR OUT_DIR [ITERS]
#
#   DATA_DIR  a copy of ../shared/data: enwiki/enwiki-2015-train-0000?-of-00005.jsonl.gz and
#             wikitext/wikitext-2-raw-v1-test.nonempty.raw (or .articles.jsonl.gz). Validation
#             uses the configs' own valid_data_path (the enwiki-2015 sample shipped in the
#             package: the same 289 held-out articles as enwiki/enwiki-2015-sample.jsonl.gz).
#   WORK_DIR  tokenized data, dataset cache, one run directory per structure with its checkpoint
#             (several GB each for configs/small), logs
#   OUT_DIR   report/ (python -m megatron_bigmac.report) and quality_runs.tar.gz: every run's
#             metrics.jsonl, config.yaml, evaluations.jsonl and logs, the report; no checkpoints
#   ITERS     training iterations per structure (default 150: with about a minute of start-up,
#             evaluation, checkpoint and WikiText-2 per run, 3 x 150 iterations of ~0.55 s fit
#             in 9 minutes on one H100); the warm-up is 10 % of them and the learning rate
#             decays to min_lr at ITERS
#
#   scripts/quality_experiment.sh ../shared/data runs/quality out 150            # one GPU
#   CONFIG_DIR=configs/tiny NPROC=2 SHARDS=1 \
#       scripts/quality_experiment.sh ../shared/data /tmp/qwork /tmp/qout 20     # 2 CPU processes
#
# Environment (all optional):
#   CONFIG_DIR   directory holding {vanilla,fine_grained,bigmac}.yaml (default configs/small;
#                a relative path starts at the caller's directory, else at the repository)
#   STRUCTURES   which configs of CONFIG_DIR to train, in order (default "vanilla fine_grained
#                bigmac"; any other NAME.yaml there works too, e.g. a variant); the
#                report covers every run directory in WORK_DIR
#   NPROC        training processes (default 1); EP etc. come from the config or EXTRA
#   EXTRA        more key=value overrides for the trainer, e.g. EXTRA="micro_batch_size=32"
#   SHARDS       how many of the 5 enwiki train shards to tokenize and train on (default 5)
#   SEED         the seed of every run (default 1234): same initialisation and data order
#   EVALS        validation evaluations during a run, besides the one at step 0 (default 8)
#   EVAL_ARGS    more arguments for megatron_bigmac.evaluate, e.g. "--stride 512"
#   WIKITEXT     the WikiText-2 file to evaluate on (default: found in DATA_DIR, see above)
#   DEADLINE_S   seconds from this script's start by which everything must be done (default 540
#                where nvidia-smi shows a GPU, else 0: no limit). Each training run gets a fair
#                share of the time left; a run that exceeds it is sent SIGUSR1, checkpoints and
#                stops early (the report then says "partial"), so the evaluations, report and
#                tarball still happen in time.
#   POST_RUN_S   seconds kept after each training run's share for its final checkpoint and its
#                WikiText-2 evaluation (default 45)
#   FINAL_S      seconds kept at the end for the report and the tarball (default 20)
#   FORCE        1: delete an existing run directory of a structure about to be trained (default:
#                refuse, since the trainer appends to an existing metrics.jsonl)
#   PYTHON       interpreter holding torch and megatron_bigmac (default python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
START=$SECONDS

die() { echo "quality_experiment.sh: error: $1" >&2; exit "${2:-2}"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
say() { printf 'quality_experiment [%4ds] %s\n' $(( SECONDS - START )) "$*"; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 3 ] || [ $# -gt 4 ]; then
    usage >&2
    die "expected DATA_DIR WORK_DIR OUT_DIR [ITERS], got $# argument(s)"
fi
[ -d "$1" ] || die "DATA_DIR: no such directory: $1"
DATA_DIR=$(cd "$1" && pwd)
WORK_DIR=$(realpath -m "$2")   # absolute (the script moves to the repository root), made later
OUT_DIR=$(realpath -m "$3")
ITERS=${4:-150}

PYTHON=${PYTHON:-python3}
# CONFIG_DIR and WIKITEXT are paths from the caller's directory (made absolute before the cd
# below); a CONFIG_DIR that is not there, e.g. the default called from elsewhere, is the
# repository's. Inside the repository it stays relative to it, as the report's title shows it.
CONFIG_DIR=${CONFIG_DIR:-configs/small}
[ ! -d "$CONFIG_DIR" ] || CONFIG_DIR=$(realpath -m -s --relative-base="$ROOT" "$CONFIG_DIR")
[ -z "${WIKITEXT:-}" ] || WIKITEXT=$(realpath -m -s "$WIKITEXT")
STRUCTURES=${STRUCTURES:-vanilla fine_grained bigmac}
NPROC=${NPROC:-1}
SHARDS=${SHARDS:-5}
SEED=${SEED:-1234}
EVALS=${EVALS:-8}
gpu=$(nvidia-smi -L 2>/dev/null | head -n1 || true)
if [ -n "$gpu" ]; then DEADLINE_S=${DEADLINE_S:-540}; else DEADLINE_S=${DEADLINE_S:-0}; fi
POST_RUN_S=${POST_RUN_S:-45}
FINAL_S=${FINAL_S:-20}
read -r -a extra <<<"${EXTRA:-}"
read -r -a eval_args <<<"${EVAL_ARGS:-}"

for name in ITERS NPROC SHARDS EVALS; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
for name in SEED DEADLINE_S POST_RUN_S FINAL_S; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || die "$name must be a non-negative integer, got '${!name}'"
done
[ "$SHARDS" -le 5 ] || die "SHARDS must be at most 5, got $SHARDS"

# Everything below runs from the repository root: configs are given relative to it, and
# `python -m megatron_bigmac...` finds the package there even when it is not pip-installed.
cd "$ROOT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT
[ -d "$CONFIG_DIR" ] || die "CONFIG_DIR: no such directory: $CONFIG_DIR"
for s in $STRUCTURES; do
    [ -f "$CONFIG_DIR/$s.yaml" ] || die "STRUCTURES: no config $CONFIG_DIR/$s.yaml for '$s'"
done

# Inputs. The shards are read in name order, so SHARDS=k always means the same first k.
shards=()
for f in "$DATA_DIR"/enwiki/enwiki-2015-train-0000[0-4]-of-00005.jsonl.gz; do
    if [ -f "$f" ]; then shards+=("$f"); fi
done
[ ${#shards[@]} -ge "$SHARDS" ] || die "DATA_DIR: ${#shards[@]} of the $SHARDS enwiki shards wanted in $DATA_DIR/enwiki/ (enwiki-2015-train-0000?-of-00005.jsonl.gz)"
shards=("${shards[@]:0:$SHARDS}")
# WikiText-2 test: the plain text (one token stream, the usual way to score WikiText) if present,
# else the same text split into articles (documents separated by <|endoftext|>).
if [ -n "${WIKITEXT:-}" ]; then
    wikitext=$WIKITEXT
elif [ -f "$DATA_DIR/wikitext/wikitext-2-raw-v1-test.nonempty.raw" ]; then
    wikitext=$DATA_DIR/wikitext/wikitext-2-raw-v1-test.nonempty.raw
elif [ -f "$DATA_DIR/wikitext/wikitext-2-raw-v1-test.articles.jsonl.gz" ]; then
    wikitext=$DATA_DIR/wikitext/wikitext-2-raw-v1-test.articles.jsonl.gz
else
    die "DATA_DIR: no wikitext/wikitext-2-raw-v1-test.nonempty.raw (or .articles.jsonl.gz) in $DATA_DIR"
fi
[ -f "$wikitext" ] || die "WIKITEXT: no such file: $wikitext"

# A run directory that already exists would get its metrics appended to (a "resumed" run in the
# report) and its checkpoint mixed up: refuse unless FORCE=1 says it may go.
for s in $STRUCTURES; do
    if [ -e "$WORK_DIR/runs/$s" ]; then
        [ "${FORCE:-0}" = 1 ] || die "$WORK_DIR/runs/$s exists (FORCE=1 deletes it, or pick another WORK_DIR or STRUCTURES)"
        rm -rf "$WORK_DIR/runs/$s"
    fi
done

mkdir -p "$WORK_DIR"/{data,runs,logs} "$OUT_DIR"
rm -rf "$OUT_DIR/report"   # an earlier call's report must not travel in this call's tarball
# The whole console also goes to a log that travels in the tarball.
exec > >(tee -a "$WORK_DIR/logs/quality_experiment.log") 2>&1
# The shipped validation sample and megatron-core's dataset indices are cached here, not in
# ~/.cache, so the experiment neither depends on nor pollutes an earlier cache.
export MEGATRON_BIGMAC_CACHE=${MEGATRON_BIGMAC_CACHE:-$WORK_DIR/cache}
export PYTHONUNBUFFERED=1
export NPROC PYTHON   # read by scripts/torchrun.sh

# Schedule: warm-up 10 %, cosine decay to ITERS, EVALS evaluations, ~20 log lines (at most every
# 10 iterations, so the report's tokens/s has enough intervals); one checkpoint, at the end.
warmup=$(( ITERS / 10 ))
eval_interval=$(( (ITERS + EVALS - 1) / EVALS ))
log_interval=$(( ITERS / 20 < 1 ? 1 : (ITERS / 20 > 10 ? 10 : ITERS / 20) ))
tarball=$OUT_DIR/quality_runs.tar.gz
: >"$WORK_DIR/logs/timings.tsv"

# One interpreter start for every check (each import of torch costs seconds).
versions=$("$PYTHON" -c '
import importlib.util, sys, torch, megatron_bigmac
print(f"python {sys.version.split()[0]}, torch {torch.__version__}"
      + ("" if importlib.util.find_spec("matplotlib") else "; NO matplotlib"))' 2>/dev/null) \
    || die "$PYTHON cannot import torch and megatron_bigmac (pip install -e . or set PYTHONPATH)"
say "start on $(hostname -s): ${gpu:-no GPU}; $versions"
say "configs $CONFIG_DIR/{${STRUCTURES// /,}}.yaml, $NPROC process(es), $ITERS iterations (warm-up $warmup, eval every $eval_interval, log every $log_interval), seed $SEED${EXTRA:+, EXTRA: $EXTRA}"
say "data: ${#shards[@]} enwiki shard(s); WikiText-2: $wikitext; work dir $WORK_DIR; deadline $( [ "$DEADLINE_S" -gt 0 ] && echo "${DEADLINE_S}s" || echo none)"
if [[ "$versions" == *"NO matplotlib"* ]]; then
    say "note: without matplotlib the report step fails; the tarball still holds the runs (run megatron_bigmac.report on them elsewhere)"
fi

# timed NAME CMD...: run CMD and record its wall time in logs/timings.tsv (status kept).
timed() {
    local name=$1 t0=$SECONDS rc=0
    shift
    "$@" || rc=$?
    printf '%s\t%d\t%d\n' "$name" $(( SECONDS - t0 )) "$rc" >>"$WORK_DIR/logs/timings.tsv"
    return "$rc"
}

# Seconds left before the deadline, less what later steps need; a large number without one.
left() {
    if [ "$DEADLINE_S" -eq 0 ]; then echo 1000000; return; fi
    echo $(( DEADLINE_S - (SECONDS - START) - ${1:-0} ))
}

# Pack what should come back into one file. Called after every stage, and written under a
# temporary name then renamed: a command killed at its time limit still leaves the last
# complete tarball (never a truncated one) with everything finished so far.
pack() {
    local members=() f
    for f in "$WORK_DIR"/runs/*/{config.yaml,metrics.jsonl,evaluations.jsonl,train.log,evaluate.log} \
             "$WORK_DIR"/logs/*; do
        if [ -f "$f" ]; then members+=("${f#"$WORK_DIR"/}"); fi
    done
    local report=()
    if [ -d "$OUT_DIR/report" ]; then report=(-C "$OUT_DIR" report); fi
    if tar -czf "$tarball.tmp" -C "$WORK_DIR" "${members[@]}" "${report[@]}"; then
        mv -f "$tarball.tmp" "$tarball"
    else
        rm -f "$tarball.tmp"
        say "warning: packing $tarball failed"
    fi
}

# ------------------------------------------------------------------ 1. tokenize the shards
# One dataset of all shards, in shard order. Skipped when the same shards were tokenized already
# (a stamp names them), so a second call on the same WORK_DIR goes straight to training.
train_prefix=$WORK_DIR/data/enwiki-train_text_document
stamp=$WORK_DIR/data/enwiki-train.shards
if [ -f "$train_prefix.bin" ] && [ -f "$train_prefix.idx" ] && [ -f "$stamp" ] \
        && [ "$(cat "$stamp")" = "$(printf '%s\n' "${shards[@]##*/}")" ]; then
    say "tokenize: $train_prefix exists (same shards), skipped"
else
    say "tokenize: ${#shards[@]} shard(s) -> $train_prefix"
    rm -f "$stamp"
    if ! timed tokenize env PYTHONWARNINGS=ignore "$PYTHON" -m megatron_bigmac.data.preprocess \
            --dataset "${shards[@]}" --output-prefix "$WORK_DIR/data/enwiki-train" \
            --overwrite --log-interval 30 >"$WORK_DIR/logs/preprocess.log" 2>&1; then
        tail -n 20 "$WORK_DIR/logs/preprocess.log"
        die "tokenizing failed (log: $WORK_DIR/logs/preprocess.log)" 1
    fi
    printf '%s\n' "${shards[@]##*/}" >"$stamp"
    # The preprocess summary: documents, tokens, time, tokens/s.
    grep -v -i "warn" "$WORK_DIR/logs/preprocess.log" | tail -n 4 | sed 's/^/    /'
fi
pack

# ------------------------------------------------------------------ 2. train and evaluate
set -- $STRUCTURES
runs_left=$#
for s in $STRUCTURES; do
    run_dir=$WORK_DIR/runs/$s
    mkdir -p "$run_dir"
    # This run's share of the time left: everything after it (the other runs, each with its
    # checkpoint and evaluation, and the report) keeps its part.
    limit=$(( $(left "$FINAL_S") / runs_left - POST_RUN_S ))
    limit=$(( limit < 30 ? 30 : limit ))
    timeout_cmd=()
    share=()
    if [ "$DEADLINE_S" -gt 0 ]; then
        # The trainer checkpoints and stops by itself 15 s before its share is up
        # (exit_duration_in_mins, no signal needed). Backstops: SIGUSR1 at the share's end (the
        # same stop, passed on by scripts/torchrun.sh), KILL POST_RUN_S seconds later.
        share=("exit_duration_in_mins=$(awk -v s="$limit" 'BEGIN { printf "%.2f", (s > 45 ? s - 15 : s * 2 / 3) / 60 }')")
        timeout_cmd=(timeout -s USR1 -k "$POST_RUN_S" "$limit")
        say "train $s: $CONFIG_DIR/$s.yaml (time share ${limit}s)"
    else
        say "train $s: $CONFIG_DIR/$s.yaml"
    fi
    overrides=("train_data_path=[$train_prefix]" "train_iters=$ITERS" "lr_warmup_iters=$warmup"
               "lr_decay_iters=$ITERS" "eval_interval=$eval_interval" "log_interval=$log_interval"
               "seed=$SEED" "save=$run_dir" "log_dir=$run_dir" "save_interval=null"
               "${share[@]}" "${extra[@]}")
    set +e
    timed "train_$s" "${timeout_cmd[@]}" \
        "$ROOT/scripts/torchrun.sh" "$CONFIG_DIR/$s.yaml" "${overrides[@]}" 2>&1 \
        | tee "$run_dir/train.log" \
        | grep --line-buffered -E "validation:|stopped|^\[data\]|error|Error" | sed -u 's/^/    /'
    rc=${PIPESTATUS[0]}
    set -e
    grep " tok/s" "$run_dir/train.log" | tail -n 1 | sed 's/^/    last: /' || true
    if [ "$rc" -eq 124 ]; then
        saved=$(cat "$run_dir/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
        say "train $s: time share of ${limit}s used up: SIGUSR1 sent; last checkpoint at iteration $saved of $ITERS"
    elif [ "$rc" -ne 0 ]; then
        tail -n 25 "$run_dir/train.log" | sed 's/^/    | /'
        say "train $s: FAILED (exit status $rc; log $run_dir/train.log)"
    fi
    runs_left=$(( runs_left - 1 ))
    pack

    # WikiText-2 perplexity of the final checkpoint, one JSON line appended to evaluations.jsonl
    # (what megatron_bigmac.report reads for its WikiText-2 column). One process: evaluate
    # rebuilds the model with EP=1 from the checkpoint whatever layout trained it.
    if [ -f "$run_dir/latest_checkpointed_iteration.txt" ]; then
        # Normally seconds; the limit only keeps a hang from eating the later runs' time.
        eval_limit=$(( $(left "$FINAL_S") - runs_left * (POST_RUN_S + 30) ))
        eval_limit=$(( eval_limit < 60 ? 60 : eval_limit ))
        say "evaluate $s: WikiText-2 test"
        set +e
        timed "evaluate_$s" timeout -k 10 "$eval_limit" "$PYTHON" -m megatron_bigmac.evaluate \
            --load "$run_dir" --data "$wikitext" --json "${eval_args[@]}" \
            >"$run_dir/evaluate.out" 2>"$run_dir/evaluate.log"
        rc=$?
        set -e
        result=$(grep '^{' "$run_dir/evaluate.out" | tail -n 1 || true)
        if [ "$rc" -eq 0 ] && [ -n "$result" ]; then
            echo "$result" >>"$run_dir/evaluations.jsonl"
            "$PYTHON" -c 'import json, sys; r = json.loads(sys.argv[1]); ppl = r["perplexity"]; print("    WikiText-2 perplexity %s over %d tokens" % ("NaN (diverged)" if ppl is None else "%.2f" % ppl, r["tokens"]))' "$result" || true
        else
            cat "$run_dir/evaluate.out" >>"$run_dir/evaluate.log"
            tail -n 15 "$run_dir/evaluate.log" | sed 's/^/    | /'
            if [ "$rc" -eq 124 ]; then rc="timed out after ${eval_limit}s"; else rc="exit status $rc"; fi
            say "evaluate $s: FAILED ($rc; log $run_dir/evaluate.log)"
        fi
        rm -f "$run_dir/evaluate.out"
    else
        say "evaluate $s: skipped, no checkpoint in $run_dir"
    fi
    pack
done

# ------------------------------------------------------------------ 3. report
# Every run directory: the three structures in the paper's order, then any other (variants), all
# against Fine-Grained (the structure BigMac changes) when it is there.
report_dirs=()
for s in vanilla fine_grained bigmac; do
    if [ -d "$WORK_DIR/runs/$s" ]; then report_dirs+=("$WORK_DIR/runs/$s"); fi
done
for d in "$WORK_DIR"/runs/*/; do
    case "$(basename "$d")" in vanilla|fine_grained|bigmac) ;; *) report_dirs+=("${d%/}") ;; esac
done
baseline=()
if [ -d "$WORK_DIR/runs/fine_grained" ]; then baseline=(--baseline fine_grained); fi
gpu_name=${gpu%% (UUID*}
title="Quality: $CONFIG_DIR, $ITERS iterations, $NPROC process(es)${gpu:+ on ${gpu_name#GPU 0: }}"
say "report -> $OUT_DIR/report"
if ! timed report "$PYTHON" -m megatron_bigmac.report "${report_dirs[@]}" --out "$OUT_DIR/report" \
        "${baseline[@]}" --title "$title" >"$WORK_DIR/logs/report.log" 2>&1; then
    tail -n 10 "$WORK_DIR/logs/report.log" | sed 's/^/    | /'
    say "report: FAILED (log in the tarball: logs/report.log)"
fi

# ------------------------------------------------------------------ 4. summary
# Read straight from the run directories with the report's own reader (no plotting), so the
# table prints even where the report itself failed.
say "summary"
"$PYTHON" - "${report_dirs[@]}" <<'PY' || true
import sys
import warnings
from pathlib import Path

warnings.simplefilter("ignore")
from megatron_bigmac import report

paths = [Path(p) for p in sys.argv[1:]]
runs = [report.read_run(p, n) for p, n in zip(paths, report.run_names(paths))]
rows = [report.summarize(r, None) for r in runs]
header = ("structure", "status", "iters", "final val ppl", "WikiText-2 ppl", "tokens/s", "train time")
table = [header] + [
    (row["name"], row["status"], str(row["iterations"]), report.fmt_ppl(row["final_val_ppl"]),
     report.fmt_ppl(row["evaluations"].get(report.WIKITEXT2)),
     "n/a" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}",
     report.fmt_seconds(row["train_seconds"]))
    for row in rows]
widths = [max(len(r[i]) for r in table) for i in range(len(header))]
for r in table:
    print("    " + "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
PY
say "stage times (s):$(awk -F'\t' '{printf " %s %d%s", $1, $2, ($3 == 0 ? "" : " (status " $3 ")")}' "$WORK_DIR/logs/timings.tsv")"
pack
say "done: $tarball ($(du -h "$tarball" | cut -f1)), report $OUT_DIR/report/README.md"
