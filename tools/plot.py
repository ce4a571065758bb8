"""Figures from the files the pipeline writes: a DPO run's curves (several runs overlaid),
an SFT run's losses, the reward-KL frontier (tools/iterate.py's rounds joined as a
trajectory), the per-skill judge scores and where the log-probs moved, token by token.

    python -m tools.plot dpo out/beta2 out/beta01 --labels "beta 2" "beta 0.1" --out dpo.png
    python -m tools.plot sft out --out sft.png
    python -m tools.plot frontier out/sweep/results_test.json [more.json] --out frontier.png
    python -m tools.plot skills out/eval_default.json --out skills.png
    python -m tools.plot tokens out/eval_pairs.json --out tokens.png
    python -m tools.plot generalisation out/headline/seed*/eval_test.json \
        --labels SFT DPO "on-policy DPO" --out generalisation.png

A run folder is a train_*.py --out-dir (it reads dpo/metrics.jsonl or sft/metrics.jsonl);
the JSON files are evaluate.py's --json (sweep.py writes one as results_SPLIT.json). matplotlib
is an optional extra (pip install matplotlib); nothing else in minidpo imports it. Each
figure function returns the matplotlib Figure (the tests read its panels back).
"""

import json
import os

from errors import ArgumentParser, UserError, run_main
from flags import TINYCHAT_BETA

SAMPLED = "sampled T=1/"
SKILLS = ("arithmetic", "facts", "words", "harmful", "benign", "tone")
# (metric, panel title, y label): a DPO run's panels, train (solid) and held-out (dashed)
DPO_PANELS = [("loss", "loss", "nats"), ("rewards/accuracies", "reward accuracy", "share"),
              ("rewards/margins", "reward margin", "β·h, nats"),
              ("rewards/chosen", "reward of chosen (solid) / rejected (dotted)", "nats"),
              ("logps/chosen", "log π of chosen (solid) / rejected (dotted)", "nats, summed")]


def pyplot():
    """matplotlib.pyplot with a file backend, or a one-line error saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the figures need matplotlib, an optional extra: pip install "
                        "matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(run_dir, stage):
    path = os.path.join(run_dir, stage, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (is {run_dir} a train_{stage}.py --out-dir?)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_report(path):
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    if "results" not in report:
        raise UserError(f"{path}: not an evaluate.py --json report (no 'results')")
    return report


def split_of(reports):
    """The evaluation split all the reports were judged on (evaluate.py's --split,
    tools/iterate.py's --eval-split), or None when they differ or do not say."""
    splits = {r.get("args", {}).get("split") or r.get("args", {}).get("eval_split")
              for r in reports}
    return splits.pop() if len(splits) == 1 and None not in splits else None


def read_results(path):
    return read_report(path)["results"]


def series(records, key):
    """(steps, values) of the records that have key."""
    kept = [r for r in records if key in r]
    return [r["step"] for r in kept], [r[key] for r in kept]


def dpo_figure(run_dirs, labels):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(DPO_PANELS), figsize=(4 * len(DPO_PANELS), 3.4))
    for run_dir, label, color in zip(run_dirs, labels, plt.rcParams["axes.prop_cycle"]
                                     .by_key()["color"]):
        records = read_metrics(run_dir, "dpo")
        for ax, (key, title, unit) in zip(axes, DPO_PANELS):
            pairs = [(key, "-")]
            if key.endswith("/chosen"):
                pairs.append((key.replace("chosen", "rejected"), ":"))
            for k, style in pairs:
                ax.plot(*series(records, k), style, color=color, label=f"{label}, train"
                        if style == "-" else None)
                steps, values = series(records, "val/" + k)
                if steps:
                    ax.plot(steps, values, "--" if style == "-" else "-.", marker="o", ms=3,
                            color=color, label=f"{label}, held-out" if style == "-" else None)
            ax.set(title=title, xlabel="step", ylabel=unit)
    axes[0].legend(fontsize=7)
    fig.suptitle("DPO training curves (held-out pairs: markers)")
    fig.tight_layout()
    return fig


def sft_figure(run_dir):
    plt = pyplot()
    records = read_metrics(run_dir, "sft")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(*series(records, "loss"), label="train")
    ax.plot(*series(records, "val/loss"), "o--", label="held-out")
    ax.set(title="SFT: token-mean NLL of the assistant tokens", xlabel="step",
           ylabel="nats per token", yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig


def frontier_figure(results_paths, labels=None):
    """Sampled judge score against KL from the reference (the first checkpoint of each
    report, SFT in sweep.py's; reports of the same reference may be merged), one point
    per checkpoint: the DPO paper's Figure 2 with TinyChat's judge as the true reward.
    labels, if given, name the first report's checkpoints in order (else a run's folder
    names it)."""
    plt = pyplot()
    results, trajectories = {}, []
    named = dict(zip(read_results(results_paths[0]), labels or []))
    reports = [read_report(path) for path in results_paths]
    for path, report in zip(results_paths, reports):
        results.update(report["results"])
        if "rounds" in report.get("args", {}):  # tools/iterate.py: its rounds, joined
            trajectories.append((path, list(report["results"].values())))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {}  # a trajectory's points take its colour; the legend names it
    for (path, points), color in zip(trajectories, colors):
        run = os.path.basename(os.path.dirname(os.path.abspath(path)))
        ax.plot([r.get(SAMPLED + "kl_vs_ref", 0.0) for r in points],
                [r[SAMPLED + "score"] for r in points], "-", lw=1, color=color, zorder=0,
                label=f"on-policy rounds ({run})")
        for r in points[1:]:
            color_of[id(r)] = color
    betas = {path: beta_of_run(path) for path in results}
    curve = sorted((r.get(SAMPLED + "kl_vs_ref", 0.0), r[SAMPLED + "score"])
                   for path, r in results.items() if betas[path] is not None)
    if len(curve) > 1:  # plain DPO (Eq. 7) at each beta of the sweep, joined
        ax.plot(*zip(*curve), "-", lw=1, color="tab:blue", zorder=0,
                label="plain DPO (Eq. 7), one point per β")
    named_ref, kls, labels = False, [], []
    for path, r in results.items():
        folder = os.path.dirname(path)  # a run's folder names it; out/dpo.pt its file
        name = os.path.basename(folder) if os.path.dirname(folder) else os.path.basename(path)
        if betas[path] is not None:
            name = f"β {betas[path]:g}"
        name = named.get(path, name)
        kl = r.get(SAMPLED + "kl_vs_ref", 0.0)
        kls.append(kl)
        is_ref = kl == 0.0
        color = "tab:blue" if betas[path] is not None else color_of.get(id(r), "dimgrey")
        ax.errorbar(kl, r[SAMPLED + "score"], xerr=r.get(SAMPLED + "kl_stderr", 0.0),
                    fmt="*" if is_ref else "o", ms=12 if is_ref else 5,
                    color="black" if is_ref else color)
        if (is_ref and named_ref) or (not is_ref and id(r) in color_of):
            continue
        named_ref = named_ref or is_ref
        labels.append(ax.annotate("SFT (reference)" if is_ref else name,
                                  (kl, r[SAMPLED + "score"]), textcoords="offset points",
                                  xytext=(5, 4), fontsize=8,
                                  color=color if betas[path] is not None else "black"))
    wide = max(kls, default=0.0) > 10  # KLs over orders of magnitude: a symlog axis
    split = split_of(reports)
    ax.set(title="Reward against KL: judge score vs KL(π ‖ π_ref)"
           + (f", {split} split" if split else ""),
           xscale="symlog" if wide else "linear",
           xlabel="KL from the reference on the policy's samples, nats per answer"
           + (" (symlog)" if wide else ""), ylabel="mean judge score, sampled at T = 1")
    if trajectories or len(curve) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    spread_labels(fig, ax, labels)
    return fig


def beta_of_run(path):
    """beta of a plain-DPO run of tools/sweep.py (its run.json beside the checkpoint has
    no flag but --beta and --precompute-ref), else None."""
    record = os.path.join(os.path.dirname(path), "run.json")
    if not os.path.exists(record):
        return None
    with open(record, encoding="utf-8") as f:
        flags = [flag for flag in json.load(f)["flags"] if flag != "--precompute-ref"]
    if not flags:
        return TINYCHAT_BETA  # sweep.py's defaults, on TinyChat
    if len(flags) == 2 and flags[0] == "--beta":
        return float(flags[1])
    return None


def spread_labels(fig, ax, labels):
    """Move each point's label to the first of a few places beside it that stays inside
    the axes and overlaps neither the legend nor a label placed before it (points close
    together would otherwise print over each other)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    legend = ax.get_legend()
    placed = [legend.get_window_extent(renderer)] if legend is not None else []
    offsets = [(5, 4), (5, -11), (-5, 4), (-5, -11), (5, 13), (5, -20), (-5, 13), (-5, -20)]
    for label in labels:
        for dx, dy in offsets:
            label.set_position((dx, dy))
            label.set_horizontalalignment("left" if dx > 0 else "right")
            box = label.get_window_extent(renderer)
            fits = (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
                    and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(other) for other in placed):
                break
        else:
            label.set_position(offsets[0])
            label.set_horizontalalignment("left")
            box = label.get_window_extent(renderer)
        placed.append(box)


def skills_figure(results_path):
    plt = pyplot()
    results = read_results(results_path)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(results)
    for i, (path, r) in enumerate(results.items()):
        values = [r.get(f"{SAMPLED}score/{skill}", float("nan")) for skill in SKILLS]
        ax.bar([k + i * width for k in range(len(SKILLS))], values, width,
               label=short_name(path, results))
    ax.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(SKILLS))], SKILLS)
    ax.set(title="Judge score by skill (sampled at T = 1)", ylabel="mean judge score",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def generalisation_figure(results_paths, labels):
    """Per skill, the judge score on seen content (new wordings) beside unseen content, for
    each model; the models are the checkpoints of each evaluate.py JSON in order (one JSON
    a seed: the bar is the mean over seeds, the whisker its lowest and highest seed)."""
    plt = pyplot()
    reports = [read_report(p) for p in results_paths]
    runs = [list(r["results"].values()) for r in reports]
    if any(len(r) != len(labels) for r in runs):
        raise UserError(f"--labels names {len(labels)} models; the files hold "
                        f"{', '.join(str(len(r)) for r in runs)}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    width = 0.8 / len(labels)
    for ax, content in zip(axes, ("seen", "unseen")):
        skills = [k for k in SKILLS if f"{SAMPLED}{content}/score/{k}" in runs[0][0]]
        for m, label in enumerate(labels):
            values = [[run[m][f"{SAMPLED}{content}/score/{k}"] for run in runs] for k in skills]
            means = [sum(v) / len(v) for v in values]
            spread = [[mu - min(v) for mu, v in zip(means, values)],
                      [max(v) - mu for mu, v in zip(means, values)]]
            ax.bar([k + m * width for k in range(len(skills))], means, width, yerr=spread,
                   capsize=2, label=label)
        ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(skills))], skills)
        ax.set(title=f"{content} content" + (" (new wordings)" if content == "seen" else
                                              " (in no training file)"), ylim=(0, 1))
    axes[0].set_ylabel("mean judge score (sampled, T = 1)")
    axes[1].legend(fontsize=8)
    split = split_of(reports)
    fig.suptitle("Judge score by skill, " + (f"{split} split, " if split else "")
                 + f"{len(runs)} seed(s): bars the mean, whiskers the lowest and highest seed")
    fig.tight_layout()
    return fig


def tokens_figure(results_path, ckpt=None):
    """Per-token log π − log π_ref along a few held-out pairs (evaluate.py --pairs --json):
    one row per pair, chosen left and rejected right, the prefix they share shaded."""
    plt = pyplot()
    report = read_report(results_path)
    shifts = report.get("token_shifts")
    if not shifts:
        raise UserError(f"{results_path}: no per-token shifts: make it with python evaluate.py "
                        "--ckpt DPO.pt --ref SFT.pt --pairs PAIRS --json FILE")
    if ckpt is None:
        ckpt = list(shifts)[-1]
    if ckpt not in shifts:
        raise UserError(f"{results_path}: no shifts for {ckpt}; it has {', '.join(shifts)}")
    pairs = shifts[ckpt]
    width = max(len(p[side]) for p in pairs for side in ("chosen", "rejected"))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(max(8, 0.24 * width * 2), 2.2 * len(pairs)),
                             squeeze=False)
    low = min(min(p["chosen_shift"] + p["rejected_shift"]) for p in pairs)
    high = max(max(p["chosen_shift"] + p["rejected_shift"]) for p in pairs)
    for row, pair in zip(axes, pairs):
        for ax, side, color in zip(row, ("chosen", "rejected"), ("tab:green", "tab:red")):
            values = pair[f"{side}_shift"]
            ax.bar(range(len(values)), values, color=color)
            ax.axhline(0, color="black", lw=0.6)
            if pair["diverge"]:
                ax.axvspan(-0.5, pair["diverge"] - 0.5, color="grey", alpha=0.2,
                           label="shared with the other answer")
            ax.axvline(pair["diverge"] - 0.5, color="black", ls="--", lw=0.8)
            ax.set_xticks(range(len(values)), [repr(t)[1:-1] for t in pair[side]],
                          rotation=90, fontsize=7)
            ax.set(xlim=(-0.5, width - 0.5), ylim=(min(low, -0.5) * 1.1, max(high, 0.5) * 1.1),
                   ylabel="Δ log p, nats")
            ax.set_title(f"{side} ({pair['group'] or 'pair'}): {pair['question'][:60]}",
                         fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Where the log-probs moved: log π − log π_ref per response token "
                 f"({short_name(ckpt, shifts)}; dashed: the first differing token)")
    fig.tight_layout()
    return fig


def short_name(path, others):
    """A checkpoint's file name, with its folder when another has the same file name."""
    name = os.path.basename(path)
    if sum(os.path.basename(p) == name for p in others) > 1:
        return os.path.join(os.path.basename(os.path.dirname(path)), name)
    return name


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=["dpo", "sft", "frontier", "skills", "tokens",
                                           "generalisation"], help="which figure")
    parser.add_argument("inputs", nargs="+", help="run folders (dpo, sft) or evaluate.py "
                        "--json files (frontier, skills, tokens; generalisation: one a seed)")
    parser.add_argument("--ckpt", default=None,
                        help="tokens: whose shifts (default: the last checkpoint in the file)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="dpo: one per run folder; generalisation: one per checkpoint; "
                        "frontier: one per checkpoint of the first file")
    parser.add_argument("--out", required=True, help="the .png (or .svg) to write")
    args = parser.parse_args(argv)
    if args.figure == "dpo":
        labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.inputs]
        if len(labels) != len(args.inputs):
            parser.error("--labels needs one label per run folder")
        fig = dpo_figure(args.inputs, labels)
    elif args.figure == "frontier":
        fig = frontier_figure(args.inputs, args.labels)
    elif args.figure == "tokens":
        fig = tokens_figure(args.inputs[0], args.ckpt)
    elif args.figure == "generalisation":
        if not args.labels:
            parser.error("generalisation needs --labels, one per checkpoint (e.g. SFT DPO)")
        fig = generalisation_figure(args.inputs, args.labels)
    else:
        fig = {"sft": sft_figure, "skills": skills_figure}[args.figure](args.inputs[0])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
