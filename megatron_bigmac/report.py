"""Compare training runs: a Markdown report with perplexity curves, a summary table and speed
ratios, from the run directories the trainer writes.

    python -m megatron_bigmac.report runs/small/vanilla runs/small/fine_grained runs/small/bigmac \\
        --out docs/reports/small --baseline fine_grained

A RUN_DIR is a trainer ``log_dir`` (``metrics.jsonl`` + ``config.yaml``) or a SLURM job directory
whose ``logs/`` holds them (scripts/slurm/pretrain.sbatch). Perplexities of held-out text measured
after training (WikiText-2, ...) are read from ``evaluations.jsonl`` in the run directory: one
line per ``python -m megatron_bigmac.evaluate --json`` (append its output to the file).

``--out`` receives ``README.md`` (the report), ``val_ppl_vs_tokens.png``, ``val_ppl_vs_time.png``,
``train_loss_vs_tokens.png`` and ``summary.json`` (the table's values, unrounded; strict JSON: a
diverged run's NaN perplexity is null).

Definitions (also stated in the report):

* tokens: iterations x global batch x sequence length (from the config, or from a train record:
  tokens_per_s x step_time_s).
* wall-clock: training time rebuilt from the train records, sum of step_time_s x iterations per
  logging interval. It leaves out start-up, evaluation and checkpointing, and work lost before a
  resume (the records carry no timestamps).
* tokens/s: median of the logged tokens_per_s, without the first logging interval (warm-up)
  when there are several.
* target perplexity (``--target-ppl``, default): the lowest final validation perplexity among
  the runs that every run with a finite final perplexity reaches at some evaluation.

A run without a log, with a partial log (fewer iterations than its train_iters), with malformed
lines or with a non-finite loss is reported as such, never a crash; a RUN_DIR that does not exist
is a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
EVALUATIONS_FILE = "evaluations.jsonl"
#: Where a run directory may keep its logs: itself, or logs/ (and checkpoints/ for the config).
LOG_SUBDIRS = (".", "logs")
CONFIG_SUBDIRS = (".", "logs", "checkpoints")
WIKITEXT2 = "WikiText-2"

PLOTS = {
    "tokens": "val_ppl_vs_tokens.png",
    "time": "val_ppl_vs_time.png",
    "train_loss": "train_loss_vs_tokens.png",
}


class ReportError(ValueError):
    """Bad input to the report command; the message is one line."""


# -------------------------------------------------------------------------------------------
# Reading one run
# -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything read from one run directory; ``problems`` lists what is missing or odd."""

    path: Path
    name: str
    config: Optional[dict] = None
    train: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    evaluations: Dict[str, dict] = field(default_factory=dict)  # label -> evaluate.py record
    has_log: bool = False
    malformed_lines: int = 0
    resumes: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.evals]
        return max(steps) if steps else 0

    @property
    def train_iters(self) -> Optional[int]:
        return (self.config or {}).get("train_iters")

    @property
    def diverged_step(self) -> Optional[int]:
        """The first step whose loss (or perplexity) is NaN or infinite; None if none."""
        bad = [r["step"] for r in self.train + self.evals
               if not all(_finite(r.get(k)) for k in ("lm_loss", "perplexity") if k in r)]
        return min(bad) if bad else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _first_existing(root: Path, subdirs: Sequence[str], name: str) -> Optional[Path]:
    for sub in subdirs:
        candidate = root / sub / name
        if candidate.is_file():
            return candidate
    return None


def read_jsonl(path: Path) -> Tuple[List[dict], int]:
    """The JSON objects of a JSON-lines file and the number of lines that are not one (a line cut
    by a crash, console text appended by a shell redirection)."""
    records, malformed = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # also NaN/Infinity, as older logs wrote them
            except json.JSONDecodeError:
                malformed += 1
                continue
            if isinstance(record, dict):
                # The writers write a non-finite number as null (strict JSON): read it as NaN,
                # so a null loss or perplexity marks the run diverged and plots skip it.
                records.append({k: math.nan if v is None else v for k, v in record.items()})
            else:
                malformed += 1
    return records, malformed


def supersede_resumed(records: List[dict]) -> Tuple[List[dict], int]:
    """Records of one kind in file order, keeping the latest of each step: metrics.jsonl is
    appended across resumes, and a resumed run logs again the steps after its checkpoint. Returns
    the kept records (sorted by step) and how many times the steps went back."""
    kept: List[dict] = []
    resumes = 0
    for record in records:
        if kept and record["step"] <= kept[-1]["step"]:
            resumes += 1
            kept = [r for r in kept if r["step"] < record["step"]]
        kept.append(record)
    return kept, resumes


def dataset_label(data: str) -> str:
    """A column name for an evaluate.py ``data`` argument: WikiText-2 / WikiText-103, or the
    file's name without its suffixes."""
    lowered = data.lower().replace("_", "-")
    if "wikitext-103" in lowered or "wikitext103" in lowered:
        return "WikiText-103"
    if "wikitext" in lowered:
        return WIKITEXT2
    name = Path(data.split(":", 1)[-1]).name
    for suffix in (".gz", ".jsonl", ".json", ".raw", ".txt", ".bin", ".idx"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name or data


def read_run(path: Path, name: str) -> Run:
    """Read a run directory (which must exist); what is missing becomes a problem, not an error."""
    run = Run(path=path, name=name)
    config_path = _first_existing(path, CONFIG_SUBDIRS, CONFIG_FILE)
    if config_path is None:
        run.problems.append(f"no {CONFIG_FILE}: parameters and train_iters unknown")
    else:
        try:
            loaded = yaml.safe_load(config_path.read_text())
            run.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError:
            run.config = None
        if run.config is None:
            run.problems.append(f"{config_path.name} is not a YAML mapping: ignored")

    metrics_path = _first_existing(path, LOG_SUBDIRS, METRICS_FILE)
    if metrics_path is None:
        run.problems.append(f"no {METRICS_FILE}: the run has no log")
    else:
        run.has_log = True
        records, run.malformed_lines = read_jsonl(metrics_path)
        records = [r for r in records if isinstance(r.get("step"), int)]
        run.train, train_resumes = supersede_resumed([r for r in records if r.get("kind") == "train"])
        run.evals, _ = supersede_resumed([r for r in records if r.get("kind") == "eval"])
        run.resumes = train_resumes
        _check_log(run)

    evaluations_path = _first_existing(path, LOG_SUBDIRS, EVALUATIONS_FILE)
    if evaluations_path is not None:
        records, _ = read_jsonl(evaluations_path)
        for record in records:  # a later evaluation of the same data wins
            if "data" in record and "perplexity" in record:
                run.evaluations[dataset_label(str(record["data"]))] = record
    return run


def _check_log(run: Run) -> None:
    """Add the log's problems: empty, malformed lines, partial, diverged, resumed."""
    if run.malformed_lines:
        run.problems.append(f"{run.malformed_lines} malformed line(s) in {METRICS_FILE} skipped")
    if not run.train and not run.evals:
        run.problems.append(f"{METRICS_FILE} holds no train or eval records")
        return
    if not run.evals:
        run.problems.append("no validation records (eval_iters: 0?)")
    if run.train_iters and run.last_step < run.train_iters:
        run.problems.append(f"partial log: ends at iteration {run.last_step} of {run.train_iters}")
    if run.diverged_step is not None:
        run.problems.append(f"diverged: non-finite loss at iteration {run.diverged_step}")
    if run.resumes:
        run.problems.append(f"resumed {run.resumes} time(s); the wall-clock leaves out lost work")


def status(run: Run) -> str:
    """One short word or phrase for the table."""
    if not run.has_log:
        return "no log"
    if not run.train and not run.evals:
        return "empty log"
    if run.diverged_step is not None:
        return f"diverged (it. {run.diverged_step})"
    if run.train_iters is None:
        return f"ended at it. {run.last_step}"
    if run.last_step < run.train_iters:
        return f"partial ({run.last_step}/{run.train_iters})"
    return "complete"


# -------------------------------------------------------------------------------------------
# Derived quantities: tokens, wall-clock, throughput, parameters
# -------------------------------------------------------------------------------------------


def tokens_per_iteration(run: Run) -> Optional[float]:
    """Global batch x sequence length, from the config or else from a train record."""
    cfg = run.config or {}
    if isinstance(cfg.get("global_batch_size"), int) and isinstance(cfg.get("seq_length"), int):
        return float(cfg["global_batch_size"] * cfg["seq_length"])
    for r in run.train:
        if _finite(r.get("tokens_per_s")) and _finite(r.get("step_time_s")):
            return r["tokens_per_s"] * r["step_time_s"]
    return None


def clock(run: Run) -> List[Tuple[int, float]]:
    """(step, training seconds so far) at step 0 and at every train record: each record's
    step_time_s times the iterations since the previous record."""
    points, previous, elapsed = [(0, 0.0)], 0, 0.0
    for r in run.train:
        if not _finite(r.get("step_time_s")):
            break
        elapsed += r["step_time_s"] * (r["step"] - previous)
        previous = r["step"]
        points.append((previous, elapsed))
    return points


def seconds_at(points: List[Tuple[int, float]], step: int) -> Optional[float]:
    """Training seconds at ``step``, linear between logged steps; None past the last one."""
    for (s0, t0), (s1, t1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / (s1 - s0) if s1 > s0 else t1
    return 0.0 if step == 0 else None


def throughput(run: Run) -> Optional[float]:
    """Median logged tokens/s, without the first interval (warm-up) when there are several."""
    values = [r["tokens_per_s"] for r in run.train if _finite(r.get("tokens_per_s"))]
    if len(values) > 1:
        values = values[1:]
    return statistics.median(values) if values else None


def _model_config(config: Optional[dict]):
    """(run config, BigMacConfig built on the meta device) of a run's config.yaml; None when the
    config cannot be turned into a model (an old or foreign config: the report goes on without)."""
    if not config:
        return None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron_bigmac.training.config import KEYS, from_dict
            from megatron_bigmac.training.model import model_config

            cfg = from_dict({k: v for k, v in config.items() if k in KEYS})
            return cfg, model_config(cfg, meta=True)
    except Exception:  # noqa: BLE001
        return None


def parameter_counts(config: Optional[dict]) -> Optional[Dict[str, int]]:
    """Total and MoE (router + projections + experts) parameters of the configured model, from
    megatron_bigmac.costs; None when the config cannot be turned into a model."""
    built = _model_config(config)
    if built is None:
        return None
    from megatron_bigmac.costs import MoEModelShape, count_parameters
    from megatron_bigmac.data.tokenizer import TokenizerFilesError
    from megatron_bigmac.training.model import padded_vocab_size

    cfg, model = built
    positions = cfg.max_position_embeddings or cfg.seq_length  # the learned table
    try:
        vocab = padded_vocab_size(cfg)  # reads the run's tokenizer_dir, if it set one
    except TokenizerFilesError:  # a cluster path not on this machine: no counts, no crash
        return None
    counts = count_parameters(MoEModelShape.from_config(model, positions, vocab))
    return {"total": counts["total"],
            "moe": counts["router"] + counts["projections"] + counts["experts"]}


# -------------------------------------------------------------------------------------------
# Summary of every run against a target perplexity
# -------------------------------------------------------------------------------------------


def eval_curve(run: Run) -> List[Tuple[int, float]]:
    """(step, validation perplexity) of the finite evaluations."""
    return [(r["step"], r["perplexity"]) for r in run.evals if _finite(r.get("perplexity"))]


def final_ppl(run: Run) -> Optional[float]:
    """The last evaluation's perplexity (NaN if it diverged); None without evaluations."""
    return run.evals[-1].get("perplexity") if run.evals else None


def default_target(runs: Sequence[Run]) -> Optional[float]:
    """The lowest final validation perplexity that every run with a finite final one reaches."""
    comparable = [r for r in runs if _finite(final_ppl(r))]
    for candidate in sorted(final_ppl(r) for r in comparable):
        if all(min(p for _, p in eval_curve(r)) <= candidate for r in comparable):
            return candidate
    return None


def first_reaching(run: Run, target: float) -> Optional[int]:
    """The first evaluated step whose perplexity is at most ``target``."""
    return next((step for step, ppl in eval_curve(run) if ppl <= target), None)


def summarize(run: Run, target: Optional[float]) -> dict:
    """The table row of one run, unrounded (None: not available)."""
    per_iteration = tokens_per_iteration(run)
    points = clock(run)
    reached = first_reaching(run, target) if target is not None else None
    row = {
        "name": run.name,
        "path": str(run.path),
        "status": status(run),
        "problems": list(run.problems),
        "final_step": run.evals[-1]["step"] if run.evals else None,
        "final_val_loss": run.evals[-1].get("lm_loss") if run.evals else None,
        "final_val_ppl": final_ppl(run),
        "best_val_ppl": min((p for _, p in eval_curve(run)), default=None),
        "val_ppl_by_step": dict(eval_curve(run)),
        "evaluations": {label: r["perplexity"] for label, r in run.evaluations.items()},
        "parameters": parameter_counts(run.config),
        "iterations": run.last_step,
        "tokens": per_iteration * run.last_step if per_iteration and run.last_step else None,
        "tokens_per_s": throughput(run),
        "train_seconds": points[-1][1] if len(points) > 1 else None,
        "target_ppl": target,
        "target_step": reached,
        "tokens_to_target": per_iteration * reached if per_iteration and reached is not None else None,
        "seconds_to_target": seconds_at(points, reached) if reached is not None else None,
    }
    return row


def ratios(row: dict, base: dict) -> dict:
    """Speed and quality of ``row`` relative to ``base``: throughput x, time-to-target speedup x
    (base time / row time: > 1 is faster), perplexity differences in percent."""

    def quotient(a, b):
        return a / b if _finite(a) and _finite(b) and b else None

    def percent(a, b):
        q = quotient(a, b)
        return 100.0 * (q - 1.0) if q is not None else None

    # A run that stopped early (or ran longer) is compared with the baseline at its own last
    # evaluated step, not with the baseline's final perplexity.
    step = row["final_step"]
    base_ppl = base["final_val_ppl"]
    if step != base["final_step"]:
        base_ppl = base["val_ppl_by_step"].get(step)
    out = {
        "tokens_per_s": quotient(row["tokens_per_s"], base["tokens_per_s"]),
        "time_to_target": quotient(base["seconds_to_target"], row["seconds_to_target"]),
        "tokens_to_target": quotient(base["tokens_to_target"], row["tokens_to_target"]),
        "final_val_ppl_pct": percent(row["final_val_ppl"], base_ppl),
        "final_val_ppl_step": step if step != base["final_step"] else None,
    }
    for label, ppl in row["evaluations"].items():
        out[f"{label}_pct"] = percent(ppl, base["evaluations"].get(label))
    return out


# -------------------------------------------------------------------------------------------
# Plots
# -------------------------------------------------------------------------------------------


def _token_unit(tokens: float) -> Tuple[float, str]:
    for scale, unit in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if tokens >= 2 * scale:
            return scale, f"tokens ({unit})"
    return 1.0, "tokens"


def _time_unit(seconds: float) -> Tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "hours"
    if seconds >= 2 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def plot_validation(runs: Sequence[Run], axis: str, target: Optional[float], path: Path) -> bool:
    """Validation perplexity of every run against tokens or training time, log scale; a cross
    marks where a run diverged. Returns False (no file) when no run has a finite evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in runs:
        per_iteration, points = tokens_per_iteration(run), clock(run)
        xy = []
        for step, ppl in eval_curve(run):
            x = step * per_iteration if axis == "tokens" and per_iteration else (
                seconds_at(points, step) if axis == "time" else None)
            if x is not None:
                xy.append((x, ppl))
        if xy:
            curves[run.name] = (xy, run.diverged_step is not None)
    if not curves:
        return False
    largest = max(x for xy, _ in curves.values() for x, _ in xy)
    scale, unit = _token_unit(largest) if axis == "tokens" else _time_unit(largest)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, (xy, diverged) in curves.items():
        xs, ys = [x / scale for x, _ in xy], [y for _, y in xy]
        line, = ax.plot(xs, ys, marker="o", markersize=3, label=name + (" (diverged)" if diverged else ""))
        if diverged:
            ax.plot(xs[-1], ys[-1], marker="x", markersize=10, color=line.get_color())
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:,.2f}")
    ax.set_yscale("log")
    ax.set_xlabel(unit if axis == "tokens" else f"training wall-clock ({unit})")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity vs " + ("tokens" if axis == "tokens" else "wall-clock"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_train_loss(runs: Sequence[Run], path: Path) -> bool:
    """Training loss of every run against tokens; False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run in runs:
        per_iteration = tokens_per_iteration(run)
        xy = [(r["step"] * per_iteration, r["lm_loss"]) for r in run.train
              if per_iteration and _finite(r.get("lm_loss"))]
        if xy:
            curves[run.name] = xy
    if not curves:
        return False
    scale, unit = _token_unit(max(x for xy in curves.values() for x, _ in xy))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, xy in curves.items():
        ax.plot([x / scale for x, _ in xy], [y for _, y in xy], label=name)
    ax.set_xlabel(unit)
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss vs tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------


def fmt_ppl(value) -> str:
    if value is None:
        return "n/a"
    if _finite(value):
        return f"{value:,.2f}"
    return "NaN" if isinstance(value, float) and math.isnan(value) else str(value)


def fmt_count(value) -> str:
    if value is None:
        return "n/a"
    for scale, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def fmt_seconds(value) -> str:
    if value is None:
        return "n/a"
    if value < 120:
        return f"{value:.1f} s"
    if value < 2 * 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_pct(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


#: Config keys shown in the runs table, with their column names.
RUN_COLUMNS = {
    "moe_structure": "structure", "num_layers": "layers", "hidden_size": "hidden",
    "num_experts": "experts", "moe_router_topk": "top-k", "moe_ffn_hidden_size": "expert ffn",
    "seq_length": "seq", "global_batch_size": "global batch", "train_iters": "iterations",
    "lr": "lr", "expert_model_parallel_size": "EP", "tensor_model_parallel_size": "TP",
    "bf16": "bf16", "seed": "seed",
}


#: Config keys that say where a run reads and writes, not what it trains.
LOCATION_KEYS = frozenset({
    "save", "load", "log_dir", "tensorboard_dir", "data_path", "train_data_path",
    "valid_data_path", "test_data_path", "data_cache_path", "tokenizer_model", "vocab_file",
    "merge_file",
})


def _column_value(run: Run, key: str) -> str:
    value = (run.config or {}).get(key, "n/a")
    if key == "moe_ffn_hidden_size" and value is None:  # the structure's default width
        built = _model_config(run.config)
        value = built[1].moe_ffn_hidden_size if built else None
    return str(value)


def runs_table(runs: Sequence[Run]) -> List[str]:
    """What each run is: structure and shape from its config."""
    header = ["run", "directory"] + list(RUN_COLUMNS.values())
    rows = [[run.name, f"`{run.path}`"] + [_column_value(run, k) for k in RUN_COLUMNS]
            for run in runs]
    return _table(header, rows)


_ABSENT = object()


def _shown(value) -> str:
    return "absent" if value is _ABSENT else f"`{value}`"


def _setting(config: dict, key: str):
    """A config key's value; a missing key and a key set to null (unset) are the same."""
    value = config.get(key)
    return _ABSENT if value is None else value


def config_differences(runs: Sequence[Run], base: Run) -> List[str]:
    """One line per run whose config differs from the baseline's in keys the runs table does not
    show (locations left out): ``key: value`` (baseline's value), ``absent`` for a missing key."""
    if not base.config:
        return []
    lines = []
    for run in runs:
        if run is base or not run.config:
            continue
        keys = sorted((set(run.config) | set(base.config)) - set(RUN_COLUMNS) - LOCATION_KEYS)
        changed = [(k, _setting(run.config, k), _setting(base.config, k)) for k in keys
                   if _setting(run.config, k) != _setting(base.config, k)]
        if changed:
            lines.append(f"- **{run.name}**: " + ", ".join(
                f"{k} {_shown(mine)} ({base.name}: {_shown(theirs)})" for k, mine, theirs in changed))
    return lines


def results_table(rows: Sequence[dict], labels: Sequence[str], target: Optional[float]) -> List[str]:
    target_text = fmt_ppl(target) if target is not None else "target"
    header = (["run", "status", "final val ppl", "best val ppl"] + [f"{l} ppl" for l in labels]
              + ["params", "MoE params", "tokens", "tokens/s", "train time",
                 f"time to ppl ≤ {target_text}", f"tokens to ppl ≤ {target_text}"])
    body = []
    for row in rows:
        params = row["parameters"] or {}
        reached = row["target_step"] is not None
        not_reached = "not reached" if target is not None and row["best_val_ppl"] is not None else "n/a"
        body.append(
            [row["name"], row["status"], fmt_ppl(row["final_val_ppl"]), fmt_ppl(row["best_val_ppl"])]
            + [fmt_ppl(row["evaluations"].get(l)) for l in labels]
            + [fmt_count(params.get("total")), fmt_count(params.get("moe")), fmt_count(row["tokens"]),
               "n/a" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}",
               fmt_seconds(row["train_seconds"]),
               fmt_seconds(row["seconds_to_target"]) if reached else not_reached,
               fmt_count(row["tokens_to_target"]) if reached else not_reached]
        )
    return _table(header, body)


def ratios_table(rows: Sequence[dict], base: dict, labels: Sequence[str]) -> List[str]:
    header = (["run", "tokens/s", "time to target (speedup)", "tokens to target (speedup)",
               "final val ppl"] + [f"{l} ppl" for l in labels])
    body = []
    for row in rows:
        r = ratios(row, base)
        body.append([row["name"] + (" (baseline)" if row is base else ""), fmt_ratio(r["tokens_per_s"]),
                     fmt_ratio(r["time_to_target"]), fmt_ratio(r["tokens_to_target"]),
                     fmt_pct(r["final_val_ppl_pct"]) + (f" (at step {r['final_val_ppl_step']})"
                                                        if r["final_val_ppl_step"] is not None
                                                        and r["final_val_ppl_pct"] is not None
                                                        else "")]
                    + [fmt_pct(r.get(f"{l}_pct")) for l in labels])
    return _table(header, body)


def render(title: str, runs: Sequence[Run], rows: Sequence[dict], base: dict,
           target: Optional[float], target_source: str, plots: Dict[str, bool]) -> str:
    """The whole Markdown report."""
    labels = sorted({l for row in rows for l in row["evaluations"]},
                    key=lambda l: (l != WIKITEXT2, l))
    if WIKITEXT2 not in labels:
        labels.insert(0, WIKITEXT2)
    out = [f"# {title}", "", "Generated by `python -m megatron_bigmac.report "
           + " ".join(str(r.path) for r in runs) + "`.", "", "## Runs", ""]
    out += runs_table(runs)
    differences = config_differences(runs, next(r for r in runs if r.name == base["name"]))
    if differences:
        out += ["", f"Other config keys that differ from {base['name']}'s (paths left out):",
                ""] + differences
    out += ["", "## Results", ""]
    if target is None:
        out.append("No target perplexity: no run has a finite final validation perplexity.")
    else:
        out.append(f"Target perplexity: **{fmt_ppl(target)}** ({target_source}).")
    out += [""] + results_table(rows, labels, target)
    out += ["", f"## Relative to {base['name']}", "",
            "Throughput and time/tokens to the target as speedups over the baseline (> 1x is "
            "faster); perplexities as the difference from the baseline's (negative is better), "
            "for a run that stopped at another step than the baseline against the baseline's "
            "evaluation at that step.", ""]
    out += ratios_table(rows, base, labels)
    out += ["", "## Plots", ""]
    captions = {"tokens": "Validation perplexity vs tokens",
                "time": "Validation perplexity vs training wall-clock",
                "train_loss": "Training loss vs tokens"}
    for key, drawn in plots.items():
        out.append(f"![{captions[key]}]({PLOTS[key]})" if drawn else f"{captions[key]}: no data.")
        out.append("")
    problems = [(row["name"], p) for row in rows for p in row["problems"]]
    if problems:
        out += ["## Problems", ""] + [f"- **{name}**: {p}" for name, p in problems] + [""]
    out += ["## Definitions", "",
            "- *final val ppl*: the last evaluation on the validation split (the same batches at "
            "every evaluation); *best*: the lowest one.",
            f"- *{WIKITEXT2} ppl* and other held-out columns: `{EVALUATIONS_FILE}` in the run "
            "directory (`python -m megatron_bigmac.evaluate --json` output); n/a when absent.",
            "- *params*: the configured model's parameters (megatron_bigmac.costs, tied "
            "embeddings counted once); *MoE params*: router + projections + experts.",
            "- *tokens*: iterations x global batch x sequence length.",
            "- *tokens/s*: median of the logged throughput, without the first logging interval "
            "(warm-up).",
            "- *train time* / *time to target*: training wall-clock rebuilt from the logged step "
            "times (step_time_s x iterations per logging interval), without start-up, "
            "evaluation and checkpointing; the time to target is taken at the first evaluation "
            "at or below the target.", ""]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------


def run_names(paths: Sequence[Path]) -> List[str]:
    """Short unique names: the directory's name (its parent's for a SLURM ``logs`` dir), with
    parent directories prepended while two names collide."""
    parts = [[p for p in path.resolve().parts if p not in ("/", "logs")] for path in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            return names
        depth += 1


def choose_baseline(rows: Sequence[dict], wanted: Optional[str]) -> dict:
    """The row named (or whose directory is) ``wanted``; the first by default."""
    if wanted is None:
        return rows[0]
    for row in rows:
        if wanted in (row["name"], row["path"]) or Path(wanted).resolve() == Path(row["path"]).resolve():
            return row
    raise ReportError(f"--baseline: {wanted!r} is none of the runs ({', '.join(r['name'] for r in rows)})")


def build_report(paths: Sequence[str], out: str, baseline: Optional[str] = None,
                 target_ppl: Optional[float] = None, title: Optional[str] = None) -> Path:
    """Read the runs, write the report, plots and summary.json into ``out``; returns the
    Markdown's path. Raises ReportError for bad input."""
    if not paths:
        raise ReportError("RUN_DIR: give at least one run directory")
    dirs = [Path(p) for p in paths]
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"RUN_DIR: no such directory: {d}")
    if target_ppl is not None and not (_finite(target_ppl) and target_ppl > 0):
        raise ReportError(f"--target-ppl: must be a positive number, got {target_ppl}")
    runs = [read_run(d, name) for d, name in zip(dirs, run_names(dirs))]

    target = target_ppl if target_ppl is not None else default_target(runs)
    target_source = ("--target-ppl" if target_ppl is not None else
                     "the lowest final validation perplexity that every run reaches")
    rows = [summarize(run, target) for run in runs]
    base = choose_baseline(rows, baseline)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "tokens": plot_validation(runs, "tokens", target, out_dir / PLOTS["tokens"]),
        "time": plot_validation(runs, "time", target, out_dir / PLOTS["time"]),
        "train_loss": plot_train_loss(runs, out_dir / PLOTS["train_loss"]),
    }
    report = render(title or f"Training report: {', '.join(r.name for r in runs)}",
                    runs, rows, base, target, target_source, plots)
    path = out_dir / "README.md"
    path.write_text(report + "\n")
    summary = {"target_ppl": target, "target_source": target_source, "baseline": base["name"],
               "runs": [{**row, "ratios": ratios(row, base)} for row in rows]}
    from megatron_bigmac.training.metrics import strict_json

    # A diverged run's NaN perplexity as null: strict JSON, which any parser reads.
    (out_dir / "summary.json").write_text(strict_json(summary, indent=2) + "\n")
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_bigmac.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trainer log_dir or job dir")
    parser.add_argument("--out", required=True, help="output directory, e.g. docs/reports/small")
    parser.add_argument("--baseline", default=None,
                        help="run name or directory the ratios are relative to (default: the first)")
    parser.add_argument("--target-ppl", type=float, default=None,
                        help="perplexity for 'time to target' (default: see above)")
    parser.add_argument("--title", default=None, help="the report's title")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        path = build_report(args.run_dirs, args.out, args.baseline, args.target_ppl, args.title)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
