"""The distilled encoder on the micro sandbox: a linear-teacher dataset with a variant, training
(deterministic, resumable, outliers never from the query's candidates), the tuned spec that
serves like any encoder, the evaluation report, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fastattr_distill.data import load_dataset, load_datasets
from fastattr_distill.evaluate import (evaluate, full_scores, method_scores, motif_carriers, motif_queries,
                                       write_report)
from fastattr_distill.metrics import average_precision, recall_at, spearman
from fastattr_distill.train import (Pairs, epoch_batches, load_config, rank_table, split_queries, subsample, train,
                                    with_outliers)
from fastattr_hook.encoder import Encoder
from fastattr_hook.errors import FastattrError
from fastattr_sandbox.world import MOTIFS
from fastattr_teacher.curate import curate, load_job, load_plan, run_fisher, score_queue
from fastattr_teacher.merge import merge

JOB = {"train_queries": 8, "test_queries": 2, "candidates": 24, "scored": 24, "steps": 4,
       "teacher": {"fisher_samples": 32, "query_pairs": 16, "timesteps": 2, "batch_size": 16, "scoring": "linear"},
       "variants": {"seed1": {"seed": 1}}}
TRAIN = {"epochs": 3, "batch_size": 64, "head": {"hidden": 32, "out": 16, "depth": 2}, "seed": 3}


@pytest.fixture(scope="module")
def dataset(micro_sandbox, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("distill-data")
    (folder / "job.yaml").write_text(yaml.safe_dump({"sandbox": str(micro_sandbox), "out": "run", **JOB}))
    job = load_job(folder / "job.yaml")
    curate(job)
    run_fisher(job)
    assert len(score_queue(job)) == 8 + 2 + 2  # the test queries twice: main teacher and variant
    return merge(job)


def write_config(folder: Path, dataset: Path, sandbox: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "distill.yaml"
    path.write_text(yaml.safe_dump({"dataset": str(dataset), "encoder": str(sandbox / "encoder.yaml"), "out": "out",
                                    "cache": str(dataset.parent / "features"), **TRAIN, **changes}))
    return path


@pytest.fixture(scope="module")
def trained(dataset, micro_sandbox, tmp_path_factory) -> Path:
    path = write_config(tmp_path_factory.mktemp("distill-train"), dataset, micro_sandbox)
    return train(load_config(path), path)


def test_dataset_has_variants_prompt_split_and_training_table(dataset):
    data = load_dataset(dataset)
    assert data.variants == ["seed1"] and data.variant_tau.shape == (1, len(data.key))
    test = data.queries("test")
    for q in range(len(data.query_id)):
        scored = np.isfinite(data.variant_tau[0, data.candidates(q)])
        assert scored.all() if q in test else not scored.any()
    q = test[0]
    assert not np.array_equal(data.variant_tau[0, data.candidates(q)], data.tau[data.candidates(q)])  # other noise
    # the same teacher under other noise: 0.38 measured with these tiny settings (16 query pairs, 2 timesteps)
    assert spearman(data.variant_tau[0, data.candidates(q)], data.tau[data.candidates(q)]) > 0.2
    assert len(data.train_keys) == 160 and data.candidates(q).stop - data.candidates(q).start == 160
    meta = yaml.safe_load(dataset.with_suffix(".yaml").read_text())
    assert meta["prompt_split"]["shared"] == 0 and meta["prompt_split"]["distinct_prompts"]["test"] == 2
    assert not Path(meta["job"]["out"]).is_absolute()  # recorded relative to the file
    assert set(meta["fingerprints"]) >= {"fisher", "fisher@seed1"}


def test_outliers_come_from_outside_the_query_candidates(dataset):
    data = load_dataset(dataset)
    train_q, val_q = split_queries(data, 0.25, seed=0)
    assert len(val_q) == 2 and not set(train_q) & set(val_q) and set(train_q) | set(val_q) == set(data.queries("train"))
    pairs = Pairs.of(data, train_q)
    assert pairs.label.min() == 0 and pairs.label.max() == pytest.approx(23 / 24)
    out = with_outliers(pairs, 0.3, len(data.train_keys), np.random.default_rng(0))
    swapped = out.item != pairs.item
    assert 0.2 < swapped.mean() < 0.4 and (out.label[swapped] == 1).all()
    candidates = {(q, i) for q, i in zip(pairs.query, pairs.item)}
    assert not any((q, i) in candidates for q, i in zip(out.query[swapped], out.item[swapped]))
    again = with_outliers(pairs, 0.3, len(data.train_keys), np.random.default_rng(0))
    assert np.array_equal(again.item, out.item)


def test_subsample_draws_a_fresh_share_of_each_query_ranking(dataset):
    data = load_dataset(dataset)
    pairs = Pairs.of(data, data.queries("train"))
    a = subsample(pairs, 5, np.random.default_rng(1))
    b = subsample(pairs, 5, np.random.default_rng(2))
    assert np.array_equal(np.bincount(a.query), np.minimum(np.bincount(pairs.query), 5))
    assert set(zip(a.query, a.item)) <= set(zip(pairs.query, pairs.item))  # labels travel with their pairs
    lookup = {(q, i): y for q, i, y in zip(pairs.query, pairs.item, pairs.label)}
    assert all(lookup[(q, i)] == y for q, i, y in zip(a.query, a.item, a.label))
    assert set(zip(a.query, a.item)) != set(zip(b.query, b.item))
    assert subsample(pairs, None, np.random.default_rng(1)) is pairs


def _whole_set_dataset(dataset: Path, folder: Path) -> Path:
    """A copy of ``dataset`` whose every query ranks every training item (as the linear teacher can)."""
    folder.mkdir()
    (folder / "images").symlink_to(dataset.parent / "images")
    with np.load(dataset) as z:
        arrays = dict(z)
    queries, table = len(arrays["query_id"]), arrays["train_keys"]
    rng = np.random.default_rng(0)
    arrays["key"] = np.concatenate([rng.permutation(table) for _ in range(queries)])
    arrays["rank"] = np.tile(np.arange(len(table)), queries)
    arrays["tau"] = arrays["rank"].astype(np.float64)
    arrays["offsets"] = np.arange(queries + 1) * len(table)
    arrays["variant_tau"] = np.tile(arrays["tau"], (len(arrays["variants"]), 1))
    np.savez(folder / "distill.npz", **arrays)
    (folder / "distill.yaml").write_text(dataset.with_suffix(".yaml").read_text())
    return folder / "distill.npz"


def test_block_batches_cover_every_pair_of_whole_set_rankings_once(dataset, micro_sandbox, tmp_path):
    import dataclasses

    whole = _whole_set_dataset(dataset, tmp_path / "whole")
    data = load_dataset(whole)
    train_q = data.queries("train")
    pairs, labels = Pairs.of(data, train_q), rank_table(data, train_q)
    config = load_config(write_config(tmp_path / "a", whole, micro_sandbox, block_items=48, outlier_rate=0.0))
    count, batches = epoch_batches(config, pairs, labels, train_q, len(data.train_keys), np.random.default_rng(0))
    batches = list(batches)
    assert count == len(pairs.label) and sum(b.label.size for b in batches) == count
    assert all(b.label.shape == (len(b.query), len(b.item)) and len(b.query) <= 64 // 48 and len(b.item) <= 48
               for b in batches)
    seen = [(q, i, b.label[r, c]) for b in batches for r, q in enumerate(b.query) for c, i in enumerate(b.item)]
    assert sorted(seen) == sorted(zip(pairs.query, pairs.item, pairs.label.astype(np.float32)))  # each pair once
    again = list(epoch_batches(config, pairs, labels, train_q, len(data.train_keys), np.random.default_rng(0))[1])
    assert all(np.array_equal(a.item, b.item) for a, b in zip(batches, again))
    config = dataclasses.replace(config, pairs_per_query=50)
    count, batches = epoch_batches(config, pairs, labels, train_q, len(data.train_keys), np.random.default_rng(1))
    met = np.bincount(np.concatenate([np.repeat(b.query, len(b.item)) for b in batches]))
    assert count == 50 * len(train_q) and set(met[train_q]) == {50}
    path = write_config(tmp_path / "b", whole, micro_sandbox, block_items=16, outlier_rate=0.0, epochs=2)
    report = json.loads((train(load_config(path), path).parent / "train.json").read_text())
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]
    from fastattr_distill.train import PairScorer
    from fastattr_hook.head import AttributionHead

    scorer, fq, fi = PairScorer(AttributionHead(8, 16, 4, 1).eval()), torch.randn(3, 8), torch.randn(5, 8)
    pairs_of_block = scorer(fq, fi, torch.arange(3).repeat_interleave(5), torch.arange(5).repeat(3))
    assert torch.allclose(scorer(fq, fi).ravel(), pairs_of_block, atol=1e-6)  # a block is its pairs' logits
    with pytest.raises(FastattrError, match="outlier_rate"):
        load_config(write_config(tmp_path / "c", whole, micro_sandbox, block_items=16, outlier_rate=0.1))
    with pytest.raises(FastattrError, match="ranks 24 of 160 items; block_items needs whole-set rankings"):
        rank_table(load_dataset(dataset), train_q)


def test_label_top_orders_only_the_teachers_top_and_labels_the_rest_like_outliers(dataset, micro_sandbox, tmp_path):
    whole = _whole_set_dataset(dataset, tmp_path / "whole")
    data = load_dataset(whole)
    train_q = data.queries("train")
    labels, top = rank_table(data, train_q), rank_table(data, train_q, top=40)
    n = len(data.train_keys)
    assert np.allclose(top, np.minimum(labels * n / 40, 1.0))
    first = data.candidates(train_q[0])
    rows = data.item_rows(data.key[first])
    assert np.allclose(top[0, rows], np.minimum(data.rank[first] / 40, 1.0))  # rank j -> j / 40, ranks >= 40 -> 1
    assert (top == 1).sum(axis=1).tolist() == [n - 40] * len(train_q)
    pairs = Pairs.of(data, train_q, top=40)
    assert np.array_equal(np.sort(pairs.label[pairs.query == train_q[0]]), np.sort(top[0]))
    with pytest.raises(FastattrError, match="'label_top' must be null or >= 1"):
        load_config(write_config(tmp_path / "a", whole, micro_sandbox, label_top=0))
    path = write_config(tmp_path / "b", whole, micro_sandbox, block_items=16, outlier_rate=0.0, epochs=2, label_top=40)
    report = json.loads((train(load_config(path), path).parent / "train.json").read_text())
    assert report["settings"]["label_top"] == 40 and len(report["history"]) == 2


def test_training_writes_a_tuned_encoder_that_loads_and_serves(trained, micro_sandbox):
    history = json.loads((trained.parent / "train.json").read_text())
    assert len(history["history"]) == 3 and 0 <= history["best_epoch"] <= 3  # 0: the calibrated initial head
    assert history["best_val_map"] >= max(h["val_map"] for h in history["history"]) - 1e-6  # history is rounded
    assert history["history"][-1]["train_loss"] < history["history"][0]["train_loss"]
    encoder = Encoder.from_yaml(trained, device="cpu")
    assert encoder.head is not None and encoder.dim == 16 and encoder.describe()["tuned"]
    baseline = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu")
    assert encoder.backbone_fingerprint == baseline.backbone_fingerprint != encoder.fingerprint
    spec = yaml.safe_load(trained.read_text())
    assert spec["head"] == "head.safetensors" and not Path(spec["backbones"][0]["model"][10:]).is_absolute()
    from PIL import Image

    vectors = encoder.embed([Image.new("RGB", (32, 32), "red")], ["a red circle"], role="query")
    assert vectors.shape == (1, 16) and np.isclose(np.linalg.norm(vectors), 1, atol=1e-5)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_training_is_deterministic_and_resumes_after_a_kill(trained, dataset, micro_sandbox, tmp_path, monkeypatch,
                                                            ema):
    import fastattr_distill.train as module

    if ema is not None:  # the uninterrupted run to match: the fixture's, or one that keeps the average
        reference = write_config(tmp_path / "whole", dataset, micro_sandbox, ema=ema)
        trained = train(load_config(reference), reference)
    path = write_config(tmp_path, dataset, micro_sandbox, **({} if ema is None else {"ema": ema}))
    calls = {"n": 0}
    real = module.validate

    def dies_in_epoch_two(*args):
        calls["n"] += 1
        if calls["n"] == 3:  # the initial head, epoch 1, then killed in epoch 2 (after epoch 1's checkpoint)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, "validate", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(path), path)
    assert (tmp_path / "out" / "checkpoint.pt").is_file() and not (tmp_path / "out" / "head.safetensors").exists()
    monkeypatch.setattr(module, "validate", real)
    resumed = train(load_config(path), path)
    from safetensors.torch import load_file

    a, b = load_file(trained.parent / "head.safetensors"), load_file(resumed.parent / "head.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same bits as uninterrupted
    [whole, cut] = [[{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(
        (spec.parent / "train.json").read_text())["history"]] for spec in (trained, resumed)]
    assert whole == cut  # every epoch validated the same weights


def test_ema_keeps_the_average_of_the_weights(trained, dataset, micro_sandbox, tmp_path):
    from safetensors.torch import load_file

    plain = load_file(trained.parent / "head.safetensors")
    same = write_config(tmp_path / "same", dataset, micro_sandbox, ema=1e-9)  # in float32 the average is the weights
    averaged = write_config(tmp_path / "averaged", dataset, micro_sandbox, ema=0.9)
    a = load_file(train(load_config(same), same).parent / "head.safetensors")
    b = load_file(train(load_config(averaged), averaged).parent / "head.safetensors")
    assert all(torch.equal(plain[k], a[k]) for k in plain)  # averaging changes nothing else of the run
    assert not all(torch.equal(plain[k], b[k]) for k in plain)
    with pytest.raises(FastattrError, match=r"key 'ema' must be null or in \(0, 1\)"):
        load_config(write_config(tmp_path / "bad", dataset, micro_sandbox, ema=1.0))


def test_raising_epochs_continues_a_finished_run(trained, dataset, micro_sandbox, tmp_path):
    from safetensors.torch import load_file

    path = write_config(tmp_path, dataset, micro_sandbox, epochs=2)
    train(load_config(path), path)
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 3"))
    longer = train(load_config(path), path)
    history = json.loads((longer.parent / "train.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = load_file(trained.parent / "head.safetensors"), load_file(longer.parent / "head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # 2 + 1 epochs = the 3-epoch run, bit for bit


def test_cosine_schedule_decays_per_epoch_and_binds_epochs(dataset, micro_sandbox, tmp_path):
    from fastattr_distill.train import epoch_lr

    path = write_config(tmp_path, dataset, micro_sandbox, epochs=2, lr_schedule="cosine")
    config = load_config(path)
    assert [epoch_lr(config, e) for e in range(2)] == pytest.approx([1e-3, 5e-4])
    tuned = train(config, path)
    history = json.loads((tuned.parent / "train.json").read_text())
    assert history["settings"]["lr_schedule"] == "cosine" and history["settings"]["epochs"] == 2
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 3"))  # another schedule: no silent resume
    with pytest.raises(FastattrError, match="made with other settings"):
        train(load_config(path), path)


def test_evaluation_report(trained, dataset, micro_sandbox, tmp_path):
    data = load_dataset(dataset)
    baseline = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu")
    methods = method_scores(data, Encoder.from_yaml(trained, device="cpu"), baseline, dataset.parent / "features")
    assert list(methods) == ["random", "untuned open_clip_image", "untuned open_clip_text", "untuned concatenation",
                             "tuned (tuned)", "teacher variant 'seed1'"]
    assert all(m.shape == (2, 160) for m in methods.values())
    report = evaluate(data, methods)
    assert report["L"] == {"0.42%": 1, "0.85%": 1, "3.40%": 5} and report["test_queries"] == 2
    for row in report["methods"].values():
        assert 0 <= row["mAP@0.85%"][0] <= 1 and -1 <= row["spearman"][0] <= 1
    assert report["methods"]["teacher variant 'seed1'"]["spearman"][0] > report["methods"]["random"]["spearman"][0]
    files = write_report(report, tmp_path / "eval", "fastattr distill eval ...")
    assert [f.suffix for f in files] == [".json", ".md", ".png"] and all(f.stat().st_size > 0 for f in files)
    assert "| tuned (tuned) |" in files[1].read_text() and files[2].read_bytes()[:4] == b"\x89PNG"
    assert "motif_queries" not in report  # no test prompt of the micro job asks for a motif


def test_evaluation_counts_rare_motif_carriers_on_the_test_queries_asking_for_one(trained, dataset, micro_sandbox):
    import dataclasses

    data = load_dataset(dataset)
    carriers = motif_carriers(data)
    assert sorted(set(carriers) - {None}) == sorted(MOTIFS) and all(np.sum(carriers == m) == 4 for m in MOTIFS)
    test = data.queries("test")
    prompt = data.prompt.copy()
    prompt[test[1]] = f"a small red circle with a {MOTIFS[2]}"
    data = dataclasses.replace(data, prompt=prompt)
    assert motif_queries(data, carriers) == [(1, MOTIFS[2])] and motif_queries(data, carriers, "train") == []
    baseline = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu")
    methods = method_scores(data, Encoder.from_yaml(trained, device="cpu"), baseline, dataset.parent / "features")
    report = evaluate(data, methods)["motif_queries"]
    assert report["queries"] == 1 and report["carriers"] == 4 and report["top"] == 30

    def found(scores):
        return int(np.sum(carriers[np.argsort(-scores, kind="stable")[:30]] == MOTIFS[2]))

    assert report["found"]["teacher (main run)"] == found(full_scores(data, test[1], data.tau))
    assert report["found"]["random"] == found(methods["random"][1])
    assert set(report["found"]) == {"teacher (main run)", *methods}
    assert all(report["per_query"][name] == [count] for name, count in report["found"].items())
    assert all(0 <= f <= 4 for f in report["found"].values())


def test_evaluation_against_another_teacher_seed(trained, dataset, micro_sandbox, tmp_path):
    import dataclasses

    data = load_dataset(dataset)
    test = data.queries("test")
    seed2 = np.full(len(data.tau), np.nan)
    for q in test:
        seed2[data.candidates(q)] = np.random.default_rng(q).random(data.candidates(q).stop - data.candidates(q).start)
    job = {**data.meta["job"], "train_variants": ["seed1"]}  # labels average the main run and seed1
    data = dataclasses.replace(data, meta={**data.meta, "job": job}, variants=["seed1", "seed2"],
                               variant_tau=np.vstack([data.variant_tau, seed2]))
    judged = data.with_reference("seed2")
    assert judged.variants == ["seed1", "main run"]
    for q in test:
        span = data.candidates(q)
        assert np.array_equal(judged.tau[span], seed2[span])
        assert np.array_equal(judged.variant_tau[1, span], data.tau[span])
        assert np.array_equal(judged.rank[span], np.argsort(np.argsort(-seed2[span], kind="stable"), kind="stable"))
    for q in data.queries("train"):  # labels untouched
        assert np.array_equal(judged.tau[data.candidates(q)], data.tau[data.candidates(q)])
    baseline = Encoder.from_yaml(micro_sandbox / "encoder.yaml", device="cpu")
    methods = method_scores(judged, Encoder.from_yaml(trained, device="cpu"), baseline, dataset.parent / "features")
    assert list(methods)[-3:] == ["teacher variant 'seed1'", "teacher variant 'main run'",
                                  "teacher mean of main run + seed1"]
    assert np.allclose(methods["teacher mean of main run + seed1"],
                       (methods["teacher variant 'seed1'"] + methods["teacher variant 'main run'"]) / 2)
    report = evaluate(judged, methods, reference="seed2")
    usual = evaluate(data, method_scores(data, Encoder.from_yaml(trained, device="cpu"), baseline,
                                         dataset.parent / "features"))
    assert report["reference"] == "seed2" and usual["reference"] == "main run"
    assert (report["methods"]["teacher variant 'main run'"]["spearman"]
            == usual["methods"]["teacher variant 'seed2'"]["spearman"])  # Spearman is symmetric
    assert "teacher run: seed2" in write_report(report, tmp_path / "eval", "fastattr distill eval ...")[1].read_text()
    with pytest.raises(FastattrError, match="'seed9' is not a teacher variant"):
        data.with_reference("seed9")
    seed2[data.candidates(test[0])] = np.nan
    with pytest.raises(FastattrError, match=f"test query {data.query_id[test[0]]} has no 'seed2' run"):
        dataclasses.replace(data, variant_tau=np.vstack([data.variant_tau[:1], seed2])).with_reference("seed2")


def test_ranking_metrics():
    teacher = np.arange(10.0)[::-1]  # item 0 most influential
    assert average_precision(teacher, teacher, 3) == 1.0
    assert average_precision(teacher, -teacher, 3) == pytest.approx((1 / 8 + 2 / 9 + 3 / 10) / 3)
    assert recall_at(teacher, teacher, 4) == 1.0 and recall_at(teacher, -teacher, 4) == 0.0
    assert spearman(teacher, teacher) == pytest.approx(1.0) and spearman(teacher, -teacher) == pytest.approx(-1.0)


def test_bad_input_is_named(dataset, micro_sandbox, tmp_path):
    with pytest.raises(FastattrError, match="unknown key 'epoch'"):
        load_config(write_config(tmp_path / "a", dataset, micro_sandbox, epoch=3))
    with pytest.raises(FastattrError, match="not found; make the dataset"):
        load_dataset(tmp_path / "nothing.npz")
    (tmp_path / "damaged").mkdir()  # a distill.yaml that is not UTF-8, then one that is no mapping
    (tmp_path / "damaged" / "distill.npz").write_bytes(dataset.read_bytes())
    for text, why in ((b"schema: \xe9", r"not UTF-8 \(byte 8 is 0xe9\); re-run `fastattr teacher merge`"),
                      (b"- a list", "not a distillation dataset")):
        (tmp_path / "damaged" / "distill.yaml").write_bytes(text)
        with pytest.raises(FastattrError, match=rf"damaged/distill\.yaml: {why}"):
            load_dataset(tmp_path / "damaged")
    with pytest.raises(FastattrError, match="outlier_rate"):
        load_config(write_config(tmp_path / "b", dataset, micro_sandbox, outlier_rate=1.5))
    with pytest.raises(FastattrError, match="'lr_schedule' must be one of"):
        load_config(write_config(tmp_path / "b", dataset, micro_sandbox, lr_schedule="linear"))
    # a dataset whose teacher scored another manifest
    (tmp_path / "c").mkdir()
    other = tmp_path / "c" / "distill.npz"
    other.write_bytes(dataset.read_bytes())
    meta = yaml.safe_load(dataset.with_suffix(".yaml").read_text())
    meta["fingerprints"]["manifest"] = "0" * 64
    meta["job"]["manifest"] = str(micro_sandbox / "data" / "manifest.jsonl")
    for image in ("images",):
        (tmp_path / "c" / image).symlink_to(dataset.parent / image)
    other.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    path = write_config(tmp_path / "d", other, micro_sandbox, cache=None)
    with pytest.raises(FastattrError, match="changed since the teacher scored"):
        train(load_config(path), path)
    # a head whose width does not match the backbones
    spec = yaml.safe_load((micro_sandbox / "encoder.yaml").read_text())
    from fastattr_hook.head import AttributionHead, save_head

    save_head(AttributionHead(7, 8, 4, 1), tmp_path / "head.safetensors")
    spec["backbones"] = [{**b, "model": b["model"].replace("local-dir:", f"local-dir:{micro_sandbox}/"),
                          **({"tokenizer": str(micro_sandbox / b["tokenizer"])} if b.get("tokenizer") else {})}
                         for b in spec["backbones"]]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "head": "head.safetensors"}))
    with pytest.raises(FastattrError, match="expects 7-d input"):
        Encoder.from_yaml(tmp_path / "bad.yaml", device="cpu")


def test_train_variants_add_a_second_label_run_that_training_averages(dataset, micro_sandbox, tmp_path):
    import shutil

    shutil.copytree(dataset.parent.parent, tmp_path / "job", symlinks=True)
    path = tmp_path / "job" / "job.yaml"
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "train_variants": ["abu_plus"]}))
    with pytest.raises(FastattrError, match="'train_variants': 'abu_plus' is not a name under 'variants'"):
        load_job(path)
    path.write_text(yaml.safe_dump({**spec, "train_variants": ["seed1"]}))
    job = load_job(path)  # a finished job takes train_variants: its plan and results stay valid
    run_fisher(job)
    assert sorted(score_queue(job)) == sorted(f"train-{i:05d}@seed1" for i in range(8))  # only the new runs
    data = load_dataset(merge(job, config_path=path))
    train_rows = np.concatenate([np.arange(data.offsets[q], data.offsets[q + 1]) for q in data.queries("train")])
    assert not np.isnan(data.variant_tau[0]).any()
    assert yaml.safe_load(data.path.with_suffix(".yaml").read_text())["counts"]["train_variants"] == {"seed1": 8}
    before = load_dataset(dataset)  # a counterfactual plan of the test queries stays valid, the file changed
    assert data.split_fingerprint("test") == before.split_fingerprint("test") and data.fingerprint != before.fingerprint
    assert data.split_fingerprint("train") != data.split_fingerprint("test")

    averaged = data.with_averaged_labels(["seed1"], "train.yaml")
    assert np.allclose(averaged.tau[train_rows], (data.tau[train_rows] + data.variant_tau[0, train_rows]) / 2)
    test = data.candidates(data.queries("test")[0])
    assert np.array_equal(averaged.tau[test], data.tau[test]) and np.array_equal(averaged.rank[test], data.rank[test])
    span = data.candidates(data.queries("train")[0])
    assert np.array_equal(np.argsort(averaged.rank[span]), np.argsort(-averaged.tau[span]))  # rank 0 = highest tau
    assert list(data.label_runs(["seed1"])) == [2] * len(data.query_id)
    with pytest.raises(FastattrError, match="'label_variants': 'seed2' is not a teacher variant"):
        data.with_averaged_labels(["seed2"], "train.yaml")

    config = write_config(tmp_path / "train", data.path, micro_sandbox, epochs=1, label_variants=["seed1"])
    tuned = train(load_config(config), config)
    assert json.loads((tuned.parent / "train.json").read_text())["label_runs"] == {"2": 8}

    # a variant added to a planned job is recorded in its plan; changing it afterwards is refused
    variants = {**spec["variants"], "seed2": {"seed": 2}}
    path.write_text(yaml.safe_dump({**spec, "variants": variants}))
    load_plan(load_job(path), path)
    path.write_text(yaml.safe_dump({**spec, "variants": {**variants, "seed2": {"seed": 3}}}))
    with pytest.raises(FastattrError, match="key 'variants' differs from the plan"):
        load_plan(load_job(path), path)


def _second_dataset(dataset: Path, folder: Path, prompt=lambda old, i: f"{old} number {i}") -> Path:
    """A copy of ``dataset`` as a second, train-only job of the same teacher: new prompts (``prompt``)."""
    folder.mkdir()
    (folder / "images").symlink_to(dataset.parent / "images")
    with np.load(dataset) as z:
        arrays = dict(z)
    arrays["prompt"] = np.array([prompt(str(p), i) for i, p in enumerate(arrays["prompt"])])
    arrays["split"] = np.full(len(arrays["split"]), "train")
    np.savez(folder / "distill.npz", **arrays)
    (folder / "distill.yaml").write_text(dataset.with_suffix(".yaml").read_text())
    return folder / "distill.npz"


def test_training_on_two_datasets_of_one_teacher(dataset, micro_sandbox, tmp_path):
    first = load_dataset(dataset)
    more = _second_dataset(dataset, tmp_path / "more")
    both = load_datasets([dataset, more])
    assert len(both.queries("train")) == len(first.queries("train")) + len(first.query_id)
    assert np.array_equal(both.queries("test"), first.queries("test"))  # the first job's test queries stay
    q = len(first.query_id) + 3  # a query of the second part: its candidates are its own
    assert np.array_equal(both.key[both.candidates(q)], first.key[first.candidates(3)])
    assert both.fingerprint not in (first.fingerprint, load_dataset(more).fingerprint)
    path = write_config(tmp_path / "train", dataset, micro_sandbox, epochs=1)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "dataset": [str(dataset), str(more)]}))
    report = json.loads((train(load_config(path), path).parent / "train.json").read_text())
    assert report["train_queries"] + report["val_queries"] == len(both.queries("train"))
    assert report["settings"]["dataset"] == both.fingerprint
    # a train prompt that is a test prompt of the other dataset
    leak = _second_dataset(dataset, tmp_path / "leak", prompt=lambda old, i: old)
    with pytest.raises(FastattrError, match="is a test prompt of the datasets trained on together"):
        load_datasets([dataset, leak])
    # rankings of another teacher
    meta = yaml.safe_load(more.with_suffix(".yaml").read_text())
    meta["job"]["teacher"]["timesteps"] = 9
    more.with_suffix(".yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(FastattrError, match="another teacher settings"):
        load_datasets([dataset, more])


def test_index_build_reuses_the_distillation_feature_store(trained, dataset, micro_sandbox, tmp_path):
    from index_tools.build import BuildOptions, build_bundle

    store = dataset.parent / "features"
    chunks = sorted(store.rglob("chunk-*.npy"))
    assert chunks  # training filled it (items and queries)
    manifest = micro_sandbox / "data" / "manifest.jsonl"
    cached = build_bundle(manifest, trained, tmp_path / "cached", BuildOptions(feature_cache=str(store), progress=False))
    assert sorted(store.rglob("chunk-*.npy")) == chunks  # every item's features were found, none recomputed
    plain = build_bundle(manifest, trained, tmp_path / "plain", BuildOptions(progress=False))
    assert cached.encoder.tuned and cached.items == plain.items == 160
    a, b = np.load(tmp_path / "cached" / "vectors.npy"), np.load(tmp_path / "plain" / "vectors.npy")
    assert np.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_published_architectures_at_random_weights(dataset, tmp_path):
    """The recipe for real models end to end on CPU: DINO ViT-B/16 image + CLIP ViT-B/32 text backbones
    (1280-d, as published) from local weight files, a 1280 -> 768 head, a bundle built with it."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    from fastattr_hook.head import load_head
    from index_tools.build import BuildOptions, build_bundle

    torch.manual_seed(0)
    save_file(timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0).state_dict(),
              tmp_path / "dino.safetensors")
    save_file(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), tmp_path / "clip.safetensors")
    spec = {"name": "dino-clip-untuned", "batch_size": 16, "backbones": [
        {"kind": "timm_image", "model": "vit_base_patch16_224.dino", "weights": "dino.safetensors"},
        {"kind": "open_clip_text", "model": "ViT-B-32", "weights": "clip.safetensors"}]}
    (tmp_path / "untuned.yaml").write_text(yaml.safe_dump(spec))
    untuned = Encoder.from_yaml(tmp_path / "untuned.yaml", device="cpu")
    assert untuned.feature_dim == 768 + 512
    config = write_config(tmp_path / "train", dataset, Path("/unused"), encoder=str(tmp_path / "untuned.yaml"),
                          cache=str(tmp_path / "features"), head={}, epochs=1, batch_size=256)
    tuned = train(load_config(config), config)
    head = load_head(tuned.parent / "head.safetensors")
    assert (head.in_features, head.out_features) == (1280, 768)
    assert {k.rsplit(".", 1)[0] for k in head.state_dict()} == {
        "mlp.layers.0", "mlp.layers.1", "mlp.layers.2", "mlp.output_layer", "scale", "bias"}  # published layout
    spec = yaml.safe_load(tuned.read_text())
    assert spec["backbones"][0]["weights"] == "../../dino.safetensors" and spec["backbones"][1]["model"] == "ViT-B-32"
    manifest = load_dataset(dataset).manifest
    bundle = build_bundle(manifest, tuned, tmp_path / "bundle",
                          BuildOptions(feature_cache=str(tmp_path / "features"), progress=False))
    assert bundle.dim == 768 and bundle.items == 160 and bundle.encoder.tuned


@pytest.mark.slow
def test_two_processes_train_the_same_head(dataset, micro_sandbox, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each takes half of every global batch, DDP
    averages the gradients, so the head matches the single-process one up to float summation order
    (dropout off: its masks are drawn per process)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    head = {**TRAIN["head"], "dropout": 0.0}
    single = write_config(tmp_path / "one", dataset, micro_sandbox, head=head)
    trained = train(load_config(single), single)
    path = write_config(tmp_path / "two", dataset, micro_sandbox, head=head)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "fastattr_cli", "distill", "train", "--config", str(path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(trained.parent / "head.safetensors"), load_file(tmp_path / "two" / "out" / "head.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_sandbox_serves_its_distilled_encoder(dataset, micro_sandbox, tmp_path):
    import shutil

    from fastattr_hook.attributor import Attributor
    from fastattr_sandbox import build

    root = tmp_path / "sandbox"
    shutil.copytree(micro_sandbox, root, ignore=shutil.ignore_patterns("work"))
    path = write_config(tmp_path, dataset, root, out=str(root / "tuned"), epochs=1)
    spec = train(load_config(path), path)
    with pytest.raises(FastattrError, match="not inside the sandbox"):
        build.set_encoder(root, micro_sandbox / "encoder.yaml")
    state = build.set_encoder(root, spec)
    assert state["encoder"] == "tuned/encoder.yaml" and state["figures"]["index"]["tuned"]
    assert {"tuned/encoder.yaml", "tuned/head.safetensors", "encoder.yaml"} <= set(build.verify(root))
    attributor = Attributor.from_bundle(root / "bundle", device="cpu")
    from PIL import Image

    [result] = attributor.attribute([Image.new("RGB", (32, 32), "red")], ["a red circle"], k=3)
    assert result.encoder["tuned"] and result.encoder["name"] == "tuned" and len(result.credits) == 3
    (root / "tuned" / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(FastattrError, match="head.safetensors: checksum mismatch"):
        build.verify(root)


def test_counterfactual_batches_are_seeded_epochs_of_the_whole_set():
    from fastattr_distill.counterfactual import batch_order

    order = batch_order(50, 40, 8, seed=1)  # 320 draws: 6 whole epochs and a part
    assert order.shape == (40, 8)
    assert all(np.array_equal(np.sort(order.ravel()[e * 50:(e + 1) * 50]), np.arange(50)) for e in range(6))
    assert np.array_equal(order, batch_order(50, 40, 8, seed=1))  # every run: the reference's batches
    assert not np.array_equal(order, batch_order(50, 40, 8, seed=2))


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
def test_counterfactual_runs_resume_and_report(trained, dataset, micro_sandbox, tmp_path, monkeypatch):
    from fastattr_distill import counterfactual as cf
    from fastattr_sandbox import train as sandbox_train

    job_yaml = tmp_path / "cf.yaml"
    job_yaml.write_text(yaml.safe_dump({
        "dataset": str(dataset), "out": "run", "tuned": str(trained), "untuned": str(micro_sandbox / "encoder.yaml"),
        "queries": 1, "k": [8], "steps": 6, "batch_size": 8, "eval_pairs": 16, "sample_steps": 3}))
    job = cf.load_job(job_yaml)
    meta = cf.plan(job, job_yaml)
    assert list(meta["runs"]) == ["reference"] + [f"test-00000-{m}-k8" for m in ("teacher", "untuned", "random", "tuned")]
    data = load_dataset(dataset)
    teacher_top = np.argsort(-data.tau[data.candidates(data.queries("test")[0])], kind="stable")[:8]
    assert meta["runs"]["test-00000-teacher-k8"] == sorted(teacher_top.tolist())
    assert meta["runs"]["reference"] == [] and all(len(v) == 8 for k, v in meta["runs"].items() if k != "reference")

    monkeypatch.setattr(sandbox_train, "CHECKPOINT_EVERY", 2)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dies(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # killed in the first run's step 5, after its step-4 checkpoint
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        cf.train_runs(job, job_yaml)
    assert (tmp_path / "run" / "work" / cf.run_stem(meta, "reference") / "unet.ckpt").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert len(cf.train_runs(job, job_yaml)) == 5
    assert cf.train_runs(job, job_yaml) == []  # all done: nothing retrained
    from safetensors.torch import load_file

    resumed = load_file(cf.model_path(job, meta, "reference"))
    (tmp_path / "again").mkdir()
    again_yaml = tmp_path / "again" / "cf.yaml"
    again_yaml.write_text(job_yaml.read_text())
    again = cf.load_job(again_yaml)
    again_meta = cf.plan(again, again_yaml)
    cf.train_runs(again, again_yaml)
    uninterrupted = load_file(cf.model_path(again, again_meta, "reference"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # resumed = uninterrupted, bit for bit

    table = cf.report(job, cf.measure(job, job_yaml), tmp_path / "cf", "fastattr distill counterfactual report")
    for model in (tmp_path / "run" / "models").iterdir():  # the committed results suffice to report again
        model.unlink()
    again_table = cf.report(job, cf.measure(job, job_yaml), tmp_path / "cf2", "again")
    assert json.dumps(again_table, sort_keys=True) == json.dumps(table, sort_keys=True)  # NaN intervals: 1 query
    assert set(table["per_query_dL"]["8"]) == set(cf.METHODS) and table["runs"] == table["planned_runs"] == 5
    random_result = cf.result_path(job, meta, "test-00000-random-k8")  # a readout while a run still trains
    saved = random_result.read_bytes()
    random_result.unlink()
    with pytest.raises(FastattrError, match="1 runs are not trained yet"):
        cf.measure(job, job_yaml)
    partial = cf.report(job, cf.measure(job, job_yaml, partial=True), tmp_path / "partial", "partial", planned=5)
    assert partial["runs"] == 4 and "random" not in partial["k"]["8"] and "tuned - random" not in partial["k"]["8"]
    assert "Partial readout: 4 of 5 planned runs" in (tmp_path / "partial.md").read_text()
    random_result.write_bytes(saved)
    plan_path = tmp_path / "run" / "plan.json"  # a new head changes the tuned removals: only that run is redone
    changed = json.loads(plan_path.read_text())
    changed["runs"]["test-00000-tuned-k8"] = changed["runs"]["test-00000-random-k8"][::-1][:7] + [0]
    changed["runs"]["test-00000-tuned-k8"].sort()
    plan_path.write_text(json.dumps(changed))
    from fastattr_hook.files import claim

    with claim(tmp_path / "run" / "work" / f"{cf.run_stem(changed, 'test-00000-tuned-k8')}.claim") as held:
        assert held and cf.train_runs(job, job_yaml) == []  # another process holds the run: left to it
    assert cf.train_runs(job, job_yaml) == ["test-00000-tuned-k8"]
    entry = table["k"]["8"]
    assert set(cf.METHODS) <= set(entry) and {"tuned - untuned", "tuned - random"} <= set(entry)
    for method in cf.METHODS:
        assert np.isfinite(entry[method]["dL"][0]) and entry[method]["mse"][0] >= 0
        assert -1 <= entry[method]["similarity"][0] <= 1 + 1e-6
    assert (tmp_path / "cf.png").read_bytes()[:4] == b"\x89PNG" and "## K = 8" in (tmp_path / "cf.md").read_text()
    job_yaml.write_text(job_yaml.read_text().replace("steps: 6", "steps: 7"))
    with pytest.raises(FastattrError, match="key 'steps' differs from the plan"):
        cf.train_runs(cf.load_job(job_yaml), job_yaml)


def test_a_plan_with_more_queries_measures_the_reference_again(tmp_path):
    from types import SimpleNamespace

    from fastattr_distill import counterfactual as cf

    job = SimpleNamespace(out=tmp_path)
    meta = {"queries": [3, 5], "runs": {"reference": [], "test-00003-tuned-k8": [1, 2]}}
    more = {"queries": [3, 5, 8], "runs": {**meta["runs"], "test-00008-tuned-k8": [4, 6]}}
    assert cf.model_path(job, meta, "reference") == cf.model_path(job, more, "reference")  # the same retraining
    assert cf.result_path(job, meta, "reference") != cf.result_path(job, more, "reference")  # measured on more
    assert cf.result_path(job, meta, "test-00003-tuned-k8") == cf.result_path(job, more, "test-00003-tuned-k8")


def test_claims_share_a_queue_between_processes(tmp_path):
    from fastattr_hook.files import claim

    with claim(tmp_path / "work" / "run.claim") as first, claim(tmp_path / "work" / "run.claim") as second:
        assert first and not second  # flock: a second open file description is refused, as another process is
    with claim(tmp_path / "work" / "run.claim") as again:
        assert again  # released with its holder
    with pytest.raises(KeyboardInterrupt), claim(tmp_path / "work" / "other.claim"):
        raise KeyboardInterrupt  # a killed worker
    with claim(tmp_path / "work" / "other.claim") as free:
        assert free


def test_counterfactual_pairs_methods_on_the_queries_both_have():
    from fastattr_distill.counterfactual import _paired

    tuned = {"query": [3, 5], "dL": [0.3, 0.5]}  # a partial run: query 7 not retrained for tuned yet
    untuned = {"query": [7, 5, 3], "dL": [0.07, 0.05, 0.03]}
    a, b = _paired(tuned, untuned)
    assert a.tolist() == [0.3, 0.5] and b.tolist() == [0.03, 0.05]
