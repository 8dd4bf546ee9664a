"""Refits (``ensemble/run.py --refit N``, ``ensemble/refit.py``): the configurations, epochs and images
taken from the right places, and refits scored where they can be (holdout, bundle), never out of fold."""
from __future__ import annotations

import json
import math

import pytest

from tests.ensemble.test_ensemble import _one_torch_thread  # noqa: F401 (fixture)


def row(trial_id, fold, score, best_epoch, status="completed", checkpoint="ckpt.pt", **extra) -> dict:
    """A trials.csv row as read back (strings)."""
    return {"trial_id": trial_id, "fold": str(fold), "status": status, "retrain": "False", "epochs": "10",
            "best_epoch": str(best_epoch), "best_val_miou": str(score), "checkpoint": checkpoint,
            **{k: str(v) for k, v in extra.items()}}


# --------------------------------------------------------------------------- which configurations


def test_racing_configs_ranked_by_their_mean_over_folds():
    from ensemble.refit import plan_refits

    rows = [
        # config 1: mean (0.50 + 0.60 + 0.70) / 3 = 0.60; best epochs 4, 7, 6 -> median 6
        row("a0", 0, 0.50, 4, config_id=1), row("a1", 1, 0.60, 7, config_id=1), row("a2", 2, 0.70, 6, config_id=1),
        # config 2: mean (0.80 + 0.40 + 0.45) / 3 = 0.55, the best single fold score but a lower mean
        row("b0", 0, 0.80, 3, config_id=2), row("b1", 1, 0.40, 4, config_id=2), row("b2", 2, 0.45, 9, config_id=2),
        # config 3: one fold only (0.95): ranked after every configuration with more folds
        row("c0", 0, 0.95, 2, config_id=3),
        # config 4: the best mean, but stopped early on fold 2: that fold does not count -> 2 folds, ranked
        # after the 3-fold configurations, before the 1-fold one
        row("d0", 0, 0.90, 5, config_id=4), row("d1", 1, 0.90, 5, config_id=4),
        row("d2", 2, 0.99, 1, status="stopped", config_id=4),
        # config 5: errored trials and trials without a checkpoint are never refitted
        row("e0", 0, 0.99, 5, status="error", config_id=5), row("e1", 1, 0.99, 5, checkpoint="", config_id=5),
    ]
    folds = [["i0", "i1"], ["i2", "i3"], ["i4"]]
    plans = plan_refits(rows, "val_miou", "max", 3, folds=folds, holdout=["h0"])
    assert [p.name for p in plans] == ["refit-1", "refit-2", "refit-4"]
    assert [p.mean for p in plans] == pytest.approx([0.60, (0.80 + 0.40 + 0.45) / 3, 0.90])
    assert [sorted(p.trials) for p in plans] == [[0, 1, 2], [0, 1, 2], [0, 1]]
    assert plans[0].best_trial["trial_id"] == "a2"  # its best fold trial: the config it is trained with
    # epochs: the median of the fold trials' best epochs, rounded half up
    assert [p.epochs for p in plans] == [6, 4, 5]
    assert plans[0].best_epochs == {2: 6, 1: 7, 0: 4}
    # N larger than what completed: the four that have a completed trial, with a warning
    assert len(plan_refits(rows, "val_miou", "max", 9, folds=folds, holdout=[])) == 4


def test_plain_search_ranked_by_score_and_retrained_configs_by_their_mean():
    from ensemble.refit import plan_refits

    lr = "param:optimizer.lr"
    rows = [row("t0", 0, 0.70, 3, **{lr: 0.1}), row("t1", 0, 0.60, 8, **{lr: 0.2}),
            row("t2", 1, 0.65, 5, **{lr: 0.3}), row("t3", 1, 0.75, 4, **{lr: 0.4})]
    plans = plan_refits(rows, "val_miou", "max", 2, folds=[["x"], ["y"]], holdout=[])
    assert [p.name for p in plans] == ["refit-t3", "refit-t0"] and [p.epochs for p in plans] == [4, 3]
    # mode min: the lowest score first
    assert [p.name for p in plan_refits(rows, "val_miou", "min", 1, folds=[["x"]], holdout=[])] == ["refit-t1"]
    # the two-stage search's retrain trial of t0's configuration on fold 1 (same sampled settings): one
    # configuration on two folds, mean (0.70 + 0.50) / 2 = 0.60, best epochs 3 and 4 -> 3.5 -> 4
    rows.append(row("r0", 1, 0.50, 4, **{lr: 0.1}))
    plans = plan_refits(rows, "val_miou", "max", 2, folds=[["x"], ["y"]], holdout=[])
    assert plans[0].name == "refit-t0" and plans[0].mean == pytest.approx(0.60) and plans[0].epochs == 4
    assert plans[0].best_epochs == {0: 3, 1: 4} and plans[1].name == "refit-t3"


def test_refit_epochs_rounding():
    from ensemble.refit import refit_epochs

    assert [refit_epochs(e) for e in ([5], [3, 4], [2, 3], [1, 9, 2], [0])] == [5, 4, 3, 2, 1]


def test_no_completed_trial_is_one_input_error():
    from ensemble.refit import plan_refits
    from trainables.errors import InputError

    with pytest.raises(InputError, match="no completed trial"):
        plan_refits([row("a", 0, 0.5, 3, status="stopped")], "val_miou", "max", 1, folds=[["x"]], holdout=[])


# --------------------------------------------------------------------------- on what images, for how long


def test_training_images_are_every_fold_image_and_never_the_holdout(tmp_path, monkeypatch, _one_torch_thread):  # noqa: F811
    """The refit of fake_experiment's best configuration trains on every image but the holdout, validates on
    none, for the planned epochs, and keeps the last epoch's weights."""
    import ensemble.refit as refit
    from tests.ensemble.test_crf_decisions import fake_experiment
    from trainables.checkpoint import load_checkpoint
    from trainables.folds import read_holdout
    from trainables.runfiles import read_trials_csv

    exp = fake_experiment(tmp_path, "val_miou")
    holdout = read_holdout(exp.run_dir / "folds.json")
    assert holdout and exp.folds
    plans = refit.plan_refits(read_trials_csv(exp.run_dir), "val_miou", "max", 1, folds=exp.folds, holdout=holdout)
    (plan,) = plans
    expected = sorted(set(exp.data.ids) - set(holdout))  # by hand: every image but the holdout
    assert plan.train_ids == expected and set(expected) == {i for f in exp.folds for i in f}
    assert plan.name == "refit-t1" and plan.epochs == 1  # t1 scored 0.2 > t0's 0.1, best epoch 1
    plan.epochs = 2  # two epochs, to tell the last from the first

    seen = {}

    class Recording(refit.FoldTrainer):
        def __init__(self, cfg, data, train_idx, val_idx, **kw):
            seen.update(ids=[data.ids[i] for i in train_idx], val=list(val_idx), epochs=cfg["train"]["epochs"])
            super().__init__(cfg, data, train_idx, val_idx, **kw)

        def epochs(self):
            for record in super().epochs():
                seen.setdefault("states", []).append({k: v.clone() for k, v in self.eval_model.state_dict().items()})
                yield record

    monkeypatch.setattr(refit, "FoldTrainer", Recording)
    members, records = refit.refit_members(plans, checkpoints=tmp_path / "c", out_dir=tmp_path / "refits",
                                           fingerprint=exp.data.fingerprint, device="cpu",
                                           runner=lambda jobs: [refit.train_refit(j) for j in jobs])
    assert seen["ids"] == expected and not set(seen["ids"]) & set(holdout) and seen["val"] == []
    assert seen["epochs"] == 2
    ckpt = load_checkpoint(tmp_path / "refits" / "refit-t1" / "model.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["train"]["epochs"] == 2 and ckpt["fold"] is None
    assert math.isnan(ckpt["score"]) and ckpt["extra"]["refit"]["train_images"] == len(expected)
    last, first = seen["states"][-1], seen["states"][0]
    assert all((ckpt["state_dict"][k] == last[k]).all() for k in last)  # the last epoch, not the first
    assert any(not (last[k] == first[k]).all() for k in last if last[k].is_floating_point())
    (member,) = members
    assert member.name == "refit-t1" and member.fold == refit.REFIT_FOLD and math.isnan(member.score)
    # the member predicts as every member does: the trial's input size and preprocessing
    source = load_checkpoint(read_trials_csv(exp.run_dir)[1]["checkpoint"])
    assert member.spec == refit.load_member(read_trials_csv(exp.run_dir)[1]["checkpoint"], "t1", "cpu").spec
    # the trial's config but train.epochs (and model.weights, which records what was loaded: random init here)
    for cfg in (ckpt["config"], source["config"]):
        cfg["model"].pop("weights")
    assert {**ckpt["config"], "train": {**ckpt["config"]["train"], "epochs": None}} == \
           {**source["config"], "train": {**source["config"]["train"], "epochs": None}}
    assert records[0]["best_epochs"] == {"1": 1} and records[0]["fold_trials"] == {"1": "t1"}
    saved = json.loads((tmp_path / "refits" / "refits.json").read_text())
    assert saved["refits"][0]["epochs"] == 2 and "median" in saved["epoch_rule"]
    # a rerun with the same job reuses the refit instead of training it again
    refit.refit_members(plans, checkpoints=tmp_path / "c", out_dir=tmp_path / "refits",
                        fingerprint=exp.data.fingerprint, device="cpu",
                        runner=lambda jobs: pytest.fail("an unchanged refit was trained again"))


# --------------------------------------------------------------------------- where refits are scored


@pytest.mark.slow
def test_refits_join_the_holdouts_combination_and_never_the_out_of_fold_rows(tmp_path, monkeypatch, capsys,
                                                                          _one_torch_thread):  # noqa: F811
    """ensemble/run.py --refit 1 (Ray replaced by a direct call): the out-of-fold rows are those of the
    run without refits; the holdout's combination chooses among the fold members and the refit."""
    import ensemble.refit as refit
    import ensemble.run
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment

    exp = fake_experiment(tmp_path, "val_miou")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12"])
    out = exp.run_dir / "ensemble"
    before = json.loads((out / "oof_metrics.json").read_text())
    capsys.readouterr()

    monkeypatch.setattr(refit, "run_refits", lambda jobs, cpus, gpus: [refit.train_refit(j) for j in jobs])
    monkeypatch.setattr(ensemble.run, "connect_ray", lambda address: None)  # no Ray in this test
    main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12", "--refit", "1"])
    printed = capsys.readouterr().out
    report = json.loads((out / "oof_metrics.json").read_text())
    for key in ("single", "ensemble", "tuned"):  # out of fold: the refit is in no row
        assert report[key] == before[key]
    assert report["oof_images"] == before["oof_images"]
    members = json.loads((out / "members.json").read_text())["members"]
    assert not any(m["trial_id"].startswith("refit") for f in members.values() for m in f)
    comb = report["combination"]
    assert comb["members"] == ["t0", "t1", "refit-t1"]  # the holdout's candidates include the refit
    assert comb["best_member"] == "t1"  # by validation score: a refit has none
    shipped = [n for n, w in zip(comb["members"], comb["weights"]) if w > 0]
    assert comb["refits"]["offered"] == ["refit-t1"]
    assert comb["refits"]["shipped"] == [n for n in shipped if n.startswith("refit")]
    assert report["holdout"]["refits"] == comb["refits"]["shipped"]
    assert report["refits"]["members"][0]["name"] == "refit-t1" and "out-of-fold" in report["refits"]["rows"]
    assert "refits offered: refit-t1 (1 epoch)" in printed and "out-of-fold rows never do" in printed
    info = json.loads((out / "bundle" / "bundle.json").read_text())
    assert [m["name"] for m in info["members"]] == shipped
    assert [m["name"] for m in info["members"] if m.get("refit")] == comb["refits"]["shipped"]
    page = (exp.run_dir / "report" / "report.html").read_text()
    assert "No out-of-fold row includes a refit" in page
    assert ("include the refit refit-t1" if comb["refits"]["shipped"] else "include no refit") in page


def test_debug_refits_train_one_short_epoch(tmp_path, monkeypatch, _one_torch_thread):  # noqa: F811
    """ensemble/run.py --refit 1 --debug: the refit trains one epoch of two batches (the search's
    --debug step), written under ensemble-debug/ and said so in refits.json; the plan is untouched."""
    import ensemble.refit as refit
    import ensemble.run
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment
    from trainables.cli import DEBUG_SETTINGS

    exp = fake_experiment(tmp_path, "val_miou")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    jobs_seen = []

    def run_refits(jobs, cpus, gpus):
        jobs_seen.extend(jobs)
        return [refit.train_refit(j) for j in jobs]
    monkeypatch.setattr(refit, "run_refits", run_refits)
    monkeypatch.setattr(ensemble.run, "connect_ray", lambda address: None)  # no Ray in this test
    main(["--experiment", str(exp.run_dir), "--batch-size", "12", "--refit", "1", "--debug"])
    (job,) = jobs_seen
    assert job["config"]["train"]["epochs"] == 1
    assert job["config"]["train"]["max_train_batches"] == DEBUG_SETTINGS["train.max_train_batches"] == 2
    saved = json.loads((exp.run_dir / "ensemble-debug" / "refits" / "refits.json").read_text())
    (record,) = saved["refits"]
    assert record["epochs"] == 1 and record["planned_epochs"] == 1 and "--debug" in record["debug"]
    assert not (exp.run_dir / "ensemble" / "refits").exists()  # a real run's refits are never these


def test_report_notes_say_which_rows_include_refits():
    from tune.report_ensemble import refit_note

    assert refit_note(None, "holdout") == "" and refit_note(None, "oof") == ""
    assert "No out-of-fold row includes a refit" in refit_note([], "oof")
    assert "include the refits refit-1, refit-2" in refit_note(["refit-1", "refit-2"], "test")
    assert "include no refit" in refit_note([], "holdout")


def test_holdout_rows_average_the_refit_with_the_fold_members(tmp_path, _one_torch_thread):  # noqa: F811
    """Rows (b) of the holdout with a refit offered are the average of the fold members and the refit."""
    from ensemble.holdout import holdout_indices, holdout_step
    from ensemble.infer import score_rows
    from ensemble.predictor import TTA, Ensemble, load_member
    from ensemble.refit import REFIT_FOLD, with_refits
    from tests.ensemble.test_crf_decisions import fake_experiment
    from trainables.folds import read_holdout
    from trainables.runfiles import read_trials_csv

    exp = fake_experiment(tmp_path, "val_miou")
    rows = read_trials_csv(exp.run_dir)
    members = [load_member(r["checkpoint"], r["trial_id"], "cpu") for r in rows]
    ensembles = {0: Ensemble([members[0]], TTA(), "soft", "cpu"), 1: Ensemble([members[1]], TTA(), "soft", "cpu")}
    stand_in = load_member(rows[0]["checkpoint"], "refit-x", "cpu")  # any network will do as the refit
    stand_in.fold, stand_in.score = REFIT_FOLD, math.nan
    every = with_refits(ensembles, [stand_in])
    assert list(every) == [0, 1, REFIT_FOLD] and with_refits(ensembles, []) is ensembles
    holdout = read_holdout(exp.run_dir / "folds.json")
    got = holdout_step(every, exp.data, holdout=holdout, thresholds={}, post={}, steps={}, mode="max",
                       max_size=48, batch_size=12)
    index = holdout_indices(exp.data, holdout)
    by_hand = score_rows(Ensemble([*members, stand_in], TTA(), "soft", "cpu"), exp.data, index, None, None, 1, 12)
    assert got["ensemble"]["miou"] == pytest.approx(by_hand["ensemble"]["miou"], abs=1e-12)
    assert got["single_member"] == "t1"


# --------------------------------------------------------------------------- without a holdout


def test_refit_without_a_holdout_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import ensemble.refit as refit
    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment

    exp = fake_experiment(tmp_path, "val_miou", holdout=None)
    monkeypatch.setattr(refit, "run_refits", lambda *a, **k: pytest.fail("trained without a holdout"))
    for n in ("1", "0"):
        with pytest.raises(SystemExit) as exc:
            main(["--experiment", str(exp.run_dir), "--refit", n])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--refit" in err
    assert not (exp.run_dir / "ensemble" / "bundle").exists()
    # the holdout case is the first one's message
    with pytest.raises(SystemExit):
        main(["--experiment", str(exp.run_dir), "--refit", "1"])
    assert "folds.holdout" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end, on Ray


@pytest.mark.slow
@pytest.mark.ray
def test_refit_end_to_end_on_ray(tmp_path, monkeypatch, capsys, _one_torch_thread):  # noqa: F811
    """ensemble/run.py --refit 1 on a tiny run with a holdout: the refit trains in a Ray task on a
    private local Ray and is offered to the holdout's combination."""
    import ray

    from ensemble.run import main
    from tests.ensemble.test_crf_decisions import fake_experiment

    from ensemble.refit import run_refits
    from trainables.checkpoint import load_checkpoint
    from trainables.errors import InputError
    from trainables.runfiles import read_trials_csv

    exp = fake_experiment(tmp_path, "val_miou")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    try:
        main(["--experiment", str(exp.run_dir), "--top-k", "1", "--batch-size", "12", "--refit", "1"])
        # a problem of the user's input in a task comes back as one InputError (exit 2), not a Ray traceback
        cfg = load_checkpoint(read_trials_csv(exp.run_dir)[0]["checkpoint"])["config"]
        with pytest.raises(InputError, match="refit-x: .*the dataset changed"):
            run_refits([{"name": "refit-x", "config": cfg, "train_ids": [], "fingerprint": "other"}])
    finally:
        ray.shutdown()
    report = json.loads((exp.run_dir / "ensemble" / "oof_metrics.json").read_text())
    assert report["combination"]["members"] == ["t0", "t1", "refit-t1"]
    assert (exp.run_dir / "ensemble" / "refits" / "refit-t1" / "model.pt").exists()
    assert "refits offered" in capsys.readouterr().out
