"""tools/plot.py on tiny hand-made metrics and evaluation files: the PNGs are written and
their panels hold what they should (read back through matplotlib's objects); without
matplotlib, one line says what to install."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, in_process
from errors import UserError

pytest.importorskip("matplotlib", reason="tools/plot.py's figures need matplotlib "
                    "(pip install matplotlib; .ci/run installs it)")
from tools import plot  # noqa: E402  (after the skip)


def write_run(folder, stage, records):
    os.makedirs(folder / stage, exist_ok=True)
    with open(folder / stage / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def dpo_records(scale):
    records = []
    for step in (10, 20, 30):
        r = {"step": step, "loss": 0.69 - 0.01 * step * scale, "rewards/accuracies": 0.5,
             "rewards/margins": 0.1 * step, "rewards/chosen": 0.05 * step,
             "rewards/rejected": -0.05 * step, "logps/chosen": -20.0 - step * scale,
             "logps/rejected": -25.0 - 2 * step * scale}
        if step == 30:
            r.update({f"val/{k}": v for k, v in list(r.items()) if k != "step"})
        records.append(r)
    return records


def report(path, results):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"args": {}, "results": results}, f)
    return str(path)


def scores(score, kl, skill_score):
    r = {f"sampled T=1/score/{s}": skill_score for s in plot.SKILLS}
    r.update({"sampled T=1/score": score, "sampled T=1/kl_vs_ref": kl,
              "sampled T=1/kl_stderr": 0.01 if kl else 0.0})
    return r


def test_dpo_curves_overlay_the_runs_train_and_held_out(tmp_path):
    a = write_run(tmp_path / "a", "dpo", dpo_records(1.0))
    b = write_run(tmp_path / "b", "dpo", dpo_records(3.0))
    fig = plot.dpo_figure([a, b], ["beta 2", "beta 0.1"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t, _ in plot.DPO_PANELS]
    loss = fig.axes[0]
    assert len(loss.lines) == 4  # 2 runs x (train, held-out)
    assert list(loss.lines[0].get_xdata()) == [10, 20, 30]
    assert list(loss.lines[2].get_ydata())[-1] == pytest.approx(0.69 - 0.9)  # run b, step 30
    assert len(fig.axes[4].lines) == 8  # chosen and rejected, train and held-out, 2 runs
    assert fig.axes[0].get_xlabel() == "step" and fig.axes[4].get_ylabel() == "nats, summed"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "beta 2, train", "beta 2, held-out", "beta 0.1, train", "beta 0.1, held-out"]
    out = tmp_path / "dpo.png"
    result = subprocess.run([sys.executable, "-m", "tools.plot", "dpo", a, b, "--labels",
                             "beta 2", "beta 0.1", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_sft_frontier_and_skills(tmp_path):
    sft = write_run(tmp_path / "s", "sft", [{"step": 10, "loss": 3.0}, {"step": 20,
                    "loss": 1.0, "val/loss": 1.2}])
    fig = plot.sft_figure(sft)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [2, 1]
    results = report(tmp_path / "r.json", {"out/sft.pt": scores(0.48, 0.0, 0.4),
                                           "out/sweep/ipo/dpo.pt": scores(0.69, 2.8, 0.7),
                                           "out/sweep/robust/dpo.pt": scores(0.21, 212, 0.2)})
    fig = plot.frontier_figure([results])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["SFT (reference)", "ipo", "robust"]
    assert ax.get_xscale() == "symlog" and "nats per answer" in ax.get_xlabel()
    fig = plot.skills_figure(results)
    bars = fig.axes[0].patches
    assert len(bars) == 3 * len(plot.SKILLS)
    assert [b.get_height() for b in bars[:6]] == [0.4] * 6
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(plot.SKILLS)
    for name in ("sft", "frontier", "skills"):
        out = tmp_path / f"{name}.png"
        result = in_process(plot.main, name, sft if name == "sft" else results, "--out", out)
        assert result.returncode == 0 and out.stat().st_size > 5_000, result.stderr


def by_content(base):
    """Per-skill scores on seen and unseen content (unseen: no facts), base + offsets."""
    r = {f"sampled T=1/seen/score/{s}": base + 0.01 * k for k, s in enumerate(plot.SKILLS)}
    r.update({f"sampled T=1/unseen/score/{s}": base / 2 for s in plot.SKILLS if s != "facts"})
    return r


def test_generalisation_shows_seen_beside_unseen_content_over_seeds(tmp_path):
    seeds = [report(tmp_path / f"seed{k}.json", {"sft.pt": by_content(0.2 + 0.1 * k),
                                                 "dpo.pt": by_content(0.6 + 0.1 * k)})
             for k in (0, 1)]
    fig = plot.generalisation_figure(seeds, ["SFT", "DPO"])
    seen, unseen = fig.axes[:2]
    assert [t.get_text() for t in seen.get_xticklabels()] == list(plot.SKILLS)
    assert "facts" not in [t.get_text() for t in unseen.get_xticklabels()]
    heights = [round(b.get_height(), 6) for b in seen.patches]
    assert heights[:6] == [round(0.25 + 0.01 * k, 6) for k in range(6)]  # SFT, mean of seeds
    assert heights[6:] == [round(0.65 + 0.01 * k, 6) for k in range(6)]  # DPO
    assert [round(b.get_height(), 6) for b in unseen.patches] == [0.125] * 5 + [0.325] * 5
    out = tmp_path / "generalisation.png"
    done = in_process(plot.main, "generalisation", *seeds, "--labels", "SFT", "DPO", "--out",
                      out)
    assert done.returncode == 0 and out.stat().st_size > 5_000, done.stderr
    wrong = in_process(plot.main, "generalisation", *seeds, "--labels", "SFT", "--out", out)
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: --labels names 1 model")


def test_frontier_joins_the_on_policy_rounds(tmp_path):
    rounds = tmp_path / "onpolicy" / "results.json"
    rounds.parent.mkdir()
    with open(rounds, "w", encoding="utf-8") as f:  # tools/iterate.py's results.json
        json.dump({"args": {"rounds": 2}, "results": {
            "out/sft.pt": scores(0.48, 0.0, 0.4), "out/onpolicy/round1/dpo.pt":
            scores(0.60, 0.3, 0.6), "out/onpolicy/round2/dpo.pt": scores(0.70, 0.8, 0.7)}}, f)
    offline = report(tmp_path / "r.json", {"out/sft.pt": scores(0.48, 0.0, 0.4),
                                           "out/dpo.pt": scores(0.69, 0.5, 0.7)})
    ax = plot.frontier_figure([offline, str(rounds)]).axes[0]
    trajectory = [line for line in ax.lines if line.get_label().startswith("on-policy")]
    assert len(trajectory) == 1
    assert list(trajectory[0].get_ydata()) == [0.48, 0.60, 0.70]
    assert list(trajectory[0].get_xdata()) == [0.0, 0.3, 0.8]
    # the SFT model named once, out/dpo.pt by its file; a trajectory by the legend only
    assert [t.get_text() for t in ax.texts] == ["SFT (reference)", "dpo.pt"]
    assert ax.get_xscale() == "linear"  # KLs under 10 nats: a linear axis


def test_tokens_figure_shows_each_pairs_shifts(tmp_path):
    pair = {"group": "rude", "question": "Capital of France?", "diverge": 2,
            "chosen": ["Par", "is", ".", "<|im_end|>"],
            "rejected": ["Par", "is", ",", " you", " fool", ".", "<|im_end|>"],
            "chosen_shift": [-0.1, -0.2, 0.3, 0.1],
            "rejected_shift": [-0.1, -0.2, -2.0, -3.0, -1.0, -0.5, -0.2]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"args": {}, "results": {}, "token_shifts": {
        "out/sft.pt": [pair], "out/dpo.pt": [pair, {**pair, "group": "wrong", "diverge": 0}]}}))
    fig = plot.tokens_figure(str(path))  # the last checkpoint's: two pairs
    assert len(fig.axes) == 4
    chosen, rejected = fig.axes[0], fig.axes[1]
    assert [b.get_height() for b in chosen.patches if b.get_width() == 0.8] == [
        -0.1, -0.2, 0.3, 0.1]
    assert len([b for b in rejected.patches if b.get_width() == 0.8]) == 7
    assert [t.get_text() for t in rejected.get_xticklabels()][2:5] == [",", " you", " fool"]
    assert chosen.get_title().startswith("chosen (rude): Capital of France?")
    assert fig.axes[2].get_title().startswith("chosen (wrong)")
    assert "nats" in chosen.get_ylabel()
    assert len(plot.tokens_figure(str(path), "out/sft.pt").axes) == 2
    with pytest.raises(UserError, match="no shifts for x.pt"):
        plot.tokens_figure(str(path), "x.pt")
    out = tmp_path / "tokens.png"
    result = in_process(plot.main, "tokens", path, "--out", out)
    assert result.returncode == 0 and out.stat().st_size > 5_000, result.stderr
    bare = report(tmp_path / "bare.json", {"out/sft.pt": scores(0.48, 0.0, 0.4)})
    with pytest.raises(UserError, match="no per-token shifts"):
        plot.tokens_figure(bare)


def test_without_matplotlib_one_line_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot.pyplot()
    code = ("import sys; sys.modules['matplotlib'] = None; import errors; "
            "from tools import plot; errors.run_main(plot.main, ['sft', 'x', '--out', 'y'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == ("error: the figures need matplotlib, an optional extra: pip "
                             "install matplotlib\n")


def test_frontier_joins_the_beta_sweep_and_keeps_labels_apart(tmp_path):
    results = {str(tmp_path / "sft.pt"): scores(0.50, 0.0, 0.4)}
    runs = {"sigmoid": ([], 0.74, 0.7), "beta-0.1": (["--beta", "0.1"], 0.50, 90.0),
            "beta-5": (["--beta", "5"], 0.70, 0.3), "orpo": (["--loss", "orpo"], 0.78, 0.57),
            "apo_zero": (["--loss", "apo_zero"], 0.777, 0.65),
            "rpo": (["--sft-alpha", "1.0"], 0.753, 0.56)}
    for name, (flags, score, kl) in runs.items():  # tools/sweep.py's folders
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "run.json", "w", encoding="utf-8") as f:
            json.dump({"name": name, "flags": flags + ["--precompute-ref"]}, f)
        results[str(tmp_path / name / "dpo.pt")] = scores(score, kl, 0.5)
    fig = plot.frontier_figure([report(tmp_path / "results.json", results)])
    ax = fig.axes[0]
    curve = [line for line in ax.lines if line.get_label().startswith("plain DPO")]
    assert len(curve) == 1  # the beta runs and the default (beta 2), in KL order
    assert list(curve[0].get_xdata()) == [0.3, 0.7, 90.0]
    assert list(curve[0].get_ydata()) == [0.70, 0.74, 0.50]
    texts = {t.get_text(): t for t in ax.texts}
    assert {"β 2", "β 0.1", "β 5", "orpo", "apo_zero", "rpo", "SFT (reference)"} == set(texts)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 for b in boxes)
