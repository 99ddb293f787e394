"""benchmarks/speedrun.py's fixed parts: the token stream, the eval windows, the schedule on the clock, the sweeps'
edge rule, the report, and that abot and the PyTorch reference score the same weights alike."""

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import speedrun  # noqa: E402

from abot.schedules import wsd  # noqa: E402


def write_shards(folder: Path, train: np.ndarray, held_out: np.ndarray) -> Path:
    """A minimal shards folder as `abot data prepare` writes it (only what speedrun reads)."""
    folder.mkdir()
    splits = {}
    for split, tokens in (("train", train), ("eval", held_out)):
        tokens.astype("<u2").tofile(folder / f"{split}-00000.bin")
        splits[split] = {"files": [f"{split}-00000.bin"], "tokens": [len(tokens)], "total_tokens": len(tokens)}
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16", "splits": splits}))
    return folder


def test_train_batches_are_the_same_stream_for_every_run(tmp_path):
    folder = write_shards(tmp_path / "s", np.arange(1000) % 500, np.arange(300))
    tokens = speedrun.load_split(folder, "train")
    assert tokens.tolist() == (np.arange(1000) % 500).tolist()
    first = [b for _, b in zip(range(40), speedrun.train_batches(tokens, 16, 4, seed=0))]
    again = [b for _, b in zip(range(40), speedrun.train_batches(tokens, 16, 4, seed=0))]
    other = next(speedrun.train_batches(tokens, 16, 4, seed=1))
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == other).all()
    assert first[0].shape == (4, 17)
    for window in first[0]:  # a contiguous slice of the split, starting on the seq_len grid
        start = int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(tokens, 17) == window).all(1))[0])
        assert start % 16 == 0
    per_epoch = (1000 - 17) // 16 // 4 + 1  # 62 windows -> 15 batches an epoch; epoch 1 is another order
    assert not (first[0] == first[per_epoch - 1 + 1]).all()


def test_eval_windows_are_whole_batches_of_disjoint_windows():
    tokens = np.arange(1000)
    w = speedrun.eval_windows(tokens, seq_len=15, batch=4, most=64)  # 62 windows available -> 60
    assert w.shape == (15, 4, 16)
    flat = w.reshape(-1, 16)
    assert (flat[:, 0] % 16 == 0).all() and len(set(flat[:, 0].tolist())) == 60
    assert speedrun.eval_windows(tokens, 15, 4, most=8).shape == (2, 4, 16)
    with pytest.raises(SystemExit):
        speedrun.eval_windows(np.arange(20), 15, 4, most=8)


def test_a_step_clock_trains_the_budget_in_steps_whatever_the_step_time(tmp_path):
    """--steps: each step counts 1 on the clock, so the run's steps, evaluations and lr do not depend on timing."""
    folder = write_shards(tmp_path / "s", np.arange(1000) % 500, np.arange(300))
    setup = speedrun.Setup(str(folder), 8, 1, 1, 16, 4, budget_s=20.0, eval_every_s=5.0, step_clock=True)
    recipe = speedrun.Recipe("abot", "muon_adamw", 1e-2)
    lrs = []

    def step(batch, lr):
        time.sleep(0.002 * (len(lrs) % 3))  # uneven step times: a wall clock would end elsewhere
        lrs.append(lr)

    result = speedrun.train_for_budget(step, lambda: 1.0, setup, recipe)
    assert result["steps"] == 20 and len(lrs) == 20
    assert [(e["time_s"], e["step"]) for e in result["evals"]] == [(0.0, 0), (5.0, 5), (10.0, 10), (15.0, 15),
                                                                  (20.0, 20)]
    assert lrs == [speedrun.clock_schedule(1e-2, 20.0)(float(k)) for k in range(20)]
    assert speedrun.fmt_time(15.0, speedrun.clock_unit(dataclasses.asdict(setup))) == "15 steps"
    assert speedrun.fmt_time(7.5) == "7.5 s"


def test_clock_schedule_is_wsd_over_the_budget():
    lr_at = speedrun.clock_schedule(1e-2, budget_s=100.0)
    grid = speedrun.SCHEDULE_GRID
    reference = wsd(1e-2, 1e-3, round(0.05 * grid), grid, decay_fraction=0.2)
    for t in (0.0, 1.0, 4.0, 30.0, 79.0, 85.0, 99.99):
        assert lr_at(t) == pytest.approx(reference(int(t / 100.0 * grid)))
    assert lr_at(0.0) < 1e-3 and lr_at(50.0) == pytest.approx(1e-2)
    assert lr_at(100.0) == lr_at(500.0) == pytest.approx(1e-3)  # after the budget: min_lr, lr / 10
    longer = speedrun.clock_schedule(1e-2, budget_s=100.0, decay=0.5)  # a recipe's own decay share
    reference = wsd(1e-2, 1e-3, round(0.05 * grid), grid, decay_fraction=0.5)
    for t in (30.0, 49.0, 51.0, 75.0, 99.99):
        assert longer(t) == pytest.approx(reference(int(t / 100.0 * grid)))
    assert longer(75.0) < lr_at(75.0) == pytest.approx(1e-2)


def fake_runner(monkeypatch, loss_of_lr) -> speedrun.Runner:
    """A Runner whose children are replaced by `loss_of_lr(recipe)`: one eval point, the lower the sooner."""
    def run_in_child(recipe, setup):
        loss = loss_of_lr(recipe)
        return {"final_loss": loss, "steps": 10, "tokens": 100,
                "evals": [{"time_s": 0.0, "loss": 9.0}, {"time_s": loss if math.isfinite(loss) else 9.0, "loss": loss}]}

    monkeypatch.setattr(speedrun, "run_in_child", run_in_child)
    setup = speedrun.Setup("shards", 64, 2, 4, 64, 8, 6.0, 0.6)
    return speedrun.Runner(setup, save=lambda: None)


def test_sweep_extends_one_step_past_an_edge(monkeypatch):
    runner = fake_runner(monkeypatch, lambda r: abs(math.log2(r.lr / 1.6e-2)))  # best at 1.6e-2
    best = runner.sweep("lr", [4e-3, 8e-3], lambda lr: speedrun.Recipe("abot", "adamw", lr))
    assert best.lr == pytest.approx(1.6e-2)
    sweep = runner.sweeps[-1]
    assert sweep["extended_to"] == pytest.approx(1.6e-2) and sweep["best_at_edge"]
    assert len(runner.runs) == 3
    inside = runner.sweep("lr", [4e-3, 1.6e-2, 6.4e-2], lambda lr: speedrun.Recipe("torch", "adamw", lr))
    assert inside.lr == pytest.approx(1.6e-2) and runner.sweeps[-1]["extended_to"] is None
    longer = fake_runner(monkeypatch, lambda r: 1.0 - r.decay)  # best at the top edge, 0.8; 1.6 is past the clock
    capped = longer.sweep("decay", [0.4, 0.8], lambda d: speedrun.Recipe("abot", "adamw", 1e-3, decay=d), most=1.0)
    assert capped.decay == 0.8 and longer.sweeps[-1]["extended_to"] is None and len(longer.runs) == 2
    assert "| decay | 0.8 | 0.200 | best (at the edge: extending it would pass the limit) |" in \
        speedrun.sweeps_table({"sweeps": longer.sweeps})


def test_sweep_counts_a_diverged_run_as_worst(monkeypatch):
    runner = fake_runner(monkeypatch, lambda r: math.nan if r.lr > 5e-3 else 5.0 + r.lr)
    best = runner.sweep("lr", [2e-3, 4e-3, 8e-3], lambda lr: speedrun.Recipe("abot", "adamw", lr))
    assert best.lr == pytest.approx(1e-3)  # extended below the edge, where the loss is lower still


def test_a_per_step_sweep_trains_its_anchors_steps_and_runs_its_best_on_the_clock(monkeypatch):
    """A setting that leaves a step's time alone compares per step: every value but the anchor trains the steps
    the anchor's run made on the clock, then the best runs on the clock (the row the plan goes on with)."""
    seen = []

    def sweep(setup, loss_of_lr):
        def run_in_child(recipe, setup):
            seen.append((recipe.lr, recipe.steps))
            return {"final_loss": loss_of_lr(recipe.lr), "steps": recipe.steps or 37, "evals": []}

        monkeypatch.setattr(speedrun, "run_in_child", run_in_child)
        seen.clear()
        runner = speedrun.Runner(setup, save=lambda: None)
        best = runner.sweep("lr", [1e-3, 2e-3, 4e-3], lambda lr: speedrun.Recipe("abot", "adamw", lr), anchor=4e-3)
        return best, runner.sweeps[-1]

    wall = speedrun.Setup("shards", 64, 2, 4, 64, 8, 6.0, 0.6)
    best, record = sweep(wall, lambda lr: 5.0 + abs(math.log2(lr / 2e-3)))  # best at 2e-3
    assert best == speedrun.Recipe("abot", "adamw", 2e-3)
    assert seen == [(4e-3, 0), (1e-3, 37), (2e-3, 37), (2e-3, 0)]
    assert record["steps"] == 37 and [p[2]["steps"] for p in record["points"]] == [37, 37, 0]
    # A diverged anchor gives no step count: the sweep runs on the clock.
    best, record = sweep(wall, lambda lr: math.nan if lr > 3e-3 else 5.0 + abs(math.log2(lr / 2e-3)))
    assert best.lr == 2e-3 and seen == [(4e-3, 0), (1e-3, 0), (2e-3, 0)] and record["steps"] is None
    # On a clock of steps already (--steps), every run compares per step: no anchor first, no second run.
    best, record = sweep(dataclasses.replace(wall, step_clock=True), lambda lr: 5.0 + abs(math.log2(lr / 2e-3)))
    assert best.lr == 2e-3 and seen == [(1e-3, 0), (2e-3, 0), (4e-3, 0)] and record["steps"] is None


def test_plan_and_report(monkeypatch, tmp_path):
    """The whole plan on fake runs: every row, the combination of the options that helped, the table, the plot."""
    def loss(r):
        model = dict(r.model)
        args = dict(r.optimizer_args)
        return (5.0 - (r.framework == "torch") * 0.5 - (r.optimizer in ("muon_adamw", "muon")) * 0.6
                - 0.1 * model.get("qk_norm", 0) - 0.1 * (model.get("ffn_activation") == "relu2") + 0.01 * r.lr
                + 0.01 * abs(args.get("ns_steps", 5) - 3) + 0.01 * args.get("b1", 0.9) - 0.1 * r.decay)

    runner = fake_runner(monkeypatch, loss)
    rows = speedrun.run_plan(runner, speedrun.QUICK_GRIDS)
    assert {"PyTorch AdamW", "PyTorch Muon + AdamW", "abot adamw", "abot muon_adamw", "abot + relu2",
            "abot best combination"} <= set(rows)
    combo = dict(rows["abot best combination"].model)
    assert combo == {"qk_norm": True, "ffn_activation": "relu2"}
    muon_args = [dict(r.optimizer_args) for r in runner.runs if r.optimizer == "muon_adamw"]
    assert all("adamw_lr_scale" in args for args in muon_args)  # scale 1 is one run, not two
    # The quick grid's 3 and 5, and 2 past its edge (an integer grid extends to an integer); 5 is the scale
    # sweep's run, not a second one with ns_steps written out.
    ns_sweep = next(s for s in runner.sweeps if s["name"] == "abot muon_adamw ns_steps")
    assert [p[0] for p in ns_sweep["points"]] == [2, 3, 5] and (ns_sweep["best"], ns_sweep["extended_to"]) == (3, 2)
    assert all(a.get("ns_steps") != 5 and a.get("b1") != 0.9 for a in muon_args)
    # b1: the quick grid's 0.8 and 0.9 (the ns_steps sweep's run), then 0.8 / (0.9 / 0.8) below its edge.
    b1_sweep = next(s for s in runner.sweeps if s["name"] == "abot muon_adamw b1")
    assert [p[0] for p in b1_sweep["points"]] == pytest.approx([0.8 ** 2 / 0.9, 0.8, 0.9])
    assert dict(rows["abot muon_adamw"].optimizer_args)["b1"] == pytest.approx(0.8 ** 2 / 0.9)
    # b1 leaves a step's time alone: compared per step on the anchor's (0.9's) 10 steps, then the best on the clock.
    assert [p[2]["steps"] for p in b1_sweep["points"]] == [10, 10, 0] and rows["abot muon_adamw"].steps == 0
    assert [p[2]["steps"] for p in ns_sweep["points"]] == [0, 0, 0]  # ns_steps changes it: on the clock
    # ns_steps 3, then that b1, won abot's sweeps, so PyTorch's Muon runs with each in turn, at its own best lr;
    # the one with both is the stronger reference here.
    torch_3 = rows["PyTorch Muon + AdamW, ns_steps 3"]
    assert dict(torch_3.optimizer_args) == {"ns_steps": 3} and torch_3.lr == rows["PyTorch Muon + AdamW"].lr
    name = "PyTorch Muon + AdamW, ns_steps 3, b1 0.711111"
    assert rows[name] == torch_3.with_optimizer_args(b1=dict(rows["abot muon_adamw"].optimizer_args)["b1"])
    # A longer decay won (0.4 at the quick grid's edge, then 0.8): the stronger reference runs with it too.
    decay_sweep = next(s for s in runner.sweeps if s["name"] == "abot best combination decay")
    assert [p[0] for p in decay_sweep["points"]] == [0.2, 0.4, 0.8] and rows["abot best combination"].decay == 0.8
    assert rows[f"{name}, decay 0.8"] == dataclasses.replace(rows[name], decay=0.8)
    short = rows["abot best combination, 0.5x clock"]  # the combination again, its schedule over half the budget
    assert short.clock == 0.5 and dataclasses.replace(short, clock=1.0) == rows["abot best combination"]
    path = tmp_path / "speedrun.json"
    speedrun.save_json(path, runner, rows, quick=True)
    report = json.loads(path.read_text())
    table = "\n".join(speedrun.results_table(report))
    assert "abot's best, abot best combination" in table and "| PyTorch AdamW |" in table
    sweeps = "\n".join(speedrun.sweeps_table(report))
    assert "| abot best combination decay (per step: 10 steps) | 0.8 | 4.127 | best (at the edge after extending) |" \
        in sweeps
    assert speedrun.known_runs(path, runner.setup).keys() == runner.runs.keys()  # --resume finds every run
    pytest.importorskip("matplotlib")  # a benchmark dependency, not a test one
    speedrun.write_report(report, tmp_path)
    assert (tmp_path / "speedrun.png").stat().st_size > 1000


def test_repeats_score_each_pair_against_its_own_reference_run(monkeypatch, tmp_path):
    """The decisive pair run again, alternating: each abot run against the reference run of its own pair."""
    final = {"torch": {0: 4.0, 1: 4.4, 2: 3.8}, "abot": {0: 3.0, 1: 2.2, 2: 4.0}}  # by repeat: the machine drifts
    runner = fake_runner(monkeypatch, lambda r: final[r.framework][r.repeat])
    rows = {"PyTorch Muon + AdamW": speedrun.Recipe("torch", "muon", 8e-3),
            "abot best combination, 0.8x clock": speedrun.Recipe("abot", "muon_adamw", 4e-3, clock=0.8)}
    for recipe in rows.values():
        runner(recipe)
    path = tmp_path / "speedrun.json"
    speedrun.save_json(path, runner, rows, quick=True)
    repeats = speedrun.run_repeats(runner, json.loads(path.read_text()), 2)
    assert repeats["reference"] == "PyTorch Muon + AdamW" and repeats["abot"] == "abot best combination, 0.8x clock"
    assert [[speedrun.score(a), speedrun.score(b)] for a, b in repeats["pairs"]] == [[4.0, 3.0], [4.4, 2.2],
                                                                                      [3.8, 4.0]]
    assert [r.repeat for r in runner.runs] == [0, 0, 1, 1, 2, 2]
    assert [r.framework for r in runner.runs] == ["torch", "abot"] * 3  # alternating
    speedrun.save_json(path, runner, rows, quick=True, repeats=repeats)
    report = json.loads(path.read_text())
    # The fake runs reach their final loss L at time L: pair ratios 3.0 / 4.0, 2.2 / 4.4, never (4.0 > 3.8).
    # Read between evaluations (9.0 at 0 s, then L at L s), the references at their own end: abot's 3.0 run crossed
    # 4.0 at 2.5 s (9 - 2t = 4), its 2.2 run crossed 4.4 at (9 - 4.4) / (9 - 2.2) * 2.2 = 1.49 s.
    table = "\n".join(speedrun.repeats_table(report))
    assert "| 1 | 4.000 | 10 | 10 | 3.0 s | 0.75x | 0.62x |" in table  # 2.5 / 4.0
    assert "| 2 | 4.400 | 10 | 10 | 2.2 s | 0.50x | 0.34x |" in table  # 1.49 / 4.4
    assert "| 3 | 3.800 | 10 | 10 | never | never | never |" in table
    assert "Median of the 3 pairs: 0.75x (issue 23's target: <= 0.60x); read between evaluations: 0.62x." in table
    assert speedrun.known_runs(path, runner.setup).keys() == runner.runs.keys()  # --resume keeps the repeats apart
    assert speedrun.repeats_table({k: v for k, v in report.items() if k != "repeats"}) == []  # older JSONs


def test_abot_and_the_pytorch_reference_score_the_same_weights_alike():
    """One evaluator in effect: abot's next_token loss and torch_reference's, on abot's initial weights."""
    torch = pytest.importorskip("torch")
    import mlx.core as mx
    import torch_reference as ref

    from abot.config import ModelConfig
    from abot.losses import next_token
    from abot.models.transformer import transformer

    cfg = ModelConfig(vocab_size=300, n_layers=2, d_model=32, n_heads=4, max_seq_len=16, dropout=0.0)
    model = transformer(cfg)
    params = model.init(mx.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 300, (3, 17))
    theirs = {"embed": params["embed"], "final_norm": params["final_norm"],
              **{f"{i}.{k}": v for i, block in enumerate(params["blocks"]) for k, v in block.items()}}
    theirs = {k: torch.from_numpy(np.array(v)) for k, v in theirs.items()}
    cos, sin = ref.rope_tables(16, 8, cfg.rope_theta)
    torch_loss = ref.next_token_loss(theirs, torch.from_numpy(tokens), 2, 4, cos, sin).item()
    abot_loss = next_token(model, params, mx.array(tokens.astype(np.int32)), None)[0].item()
    assert torch_loss == pytest.approx(abot_loss, abs=1e-4)


def test_others_share_is_the_busy_time_the_run_did_not_spend(monkeypatch):
    """(machine busy seconds - the run's own CPU seconds) / (wall seconds x cores), never below zero."""
    monkeypatch.setattr(speedrun.os, "cpu_count", lambda: 2)
    assert speedrun.others_share(100.0, 103.0, 2.0, 1.0) == pytest.approx(0.5)
    assert speedrun.others_share(100.0, 101.0, 1.2, 1.0) == 0.0  # clock ticks round; never negative
    assert speedrun.others_share(None, 101.0, 1.0, 1.0) is None
    assert speedrun.fmt_share({"others_cpu": 0.2}) == "20% (busy)" and speedrun.fmt_share({}) == "-"


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="Linux's /proc/stat")
def test_busy_cpu_seconds_counts_this_process_spinning():
    before, t0 = speedrun.busy_cpu_seconds(), time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    assert speedrun.busy_cpu_seconds() - before >= 0.25


def test_a_shorter_clock_shortens_the_childs_budget_and_keeps_the_eval_interval(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(speedrun, "abot_run", lambda recipe, setup: seen.update(setup=setup) or {"final_loss": 1.0})
    setup = speedrun.Setup("shards", 64, 2, 4, 64, 8, 60.0, 3.0)
    recipe = speedrun.Recipe("abot", "adamw", 1e-3, clock=0.7)
    speedrun.child_main(json.dumps({"recipe": dataclasses.asdict(recipe), "setup": dataclasses.asdict(setup)}))
    assert (seen["setup"].budget_s, seen["setup"].eval_every_s) == (pytest.approx(42.0), 3.0)
    assert recipe.label() == "abot adamw lr 0.001, 0.7x clock"
    assert dataclasses.replace(recipe, decay=0.4).label() == "abot adamw lr 0.001, decay 0.4, 0.7x clock"
    old = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("clock", "decay", "steps")}
    assert (speedrun.recipe_from_dict(old).clock, speedrun.recipe_from_dict(old).decay) == (1.0, 0.2)  # older JSON
    # A per-step sweep's point: a clock of its steps, with as many evaluations as the setup's clock (60 / 3).
    per_step = dataclasses.replace(recipe, clock=1.0, steps=40)
    speedrun.child_main(json.dumps({"recipe": dataclasses.asdict(per_step), "setup": dataclasses.asdict(setup)}))
    assert seen["setup"].step_clock and (seen["setup"].budget_s, seen["setup"].eval_every_s) == (40, 2.0)
    assert per_step.label() == "abot adamw lr 0.001, 40-step clock"
