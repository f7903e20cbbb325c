"""``fastattr distill eval``: how well each ranking agrees with the teacher on the test queries.

For every test query the teacher ranked the whole training set. Each method ranks it too:
random, each untuned backbone alone, the untuned concatenation (what fastattr served before a
head was distilled), the tuned encoder, and the dataset's teacher variants (another teacher seed:
the ceiling any student can reach; AbU+ against AbU). Reported per method: mAP(L) with standard
errors for L = 0.42%, 0.85% and 3.4% of N (method.md section 6), Spearman and recall@L.

The teacher's noise is seeded per item, so runs of one seed share part of their error, and a head
trained on seed-0 labels is partly credited for it when judged against seed-0 test labels. Judged
against a seed no label was made with (``--reference``), it is not, and the mean of the runs the
labels average (job key ``train_variants``) is the ceiling of a head trained on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastattr_hook.files import atomic_path, atomic_write_text
from fastattr_hook.encoder import Encoder
from fastattr_hook.errors import FastattrError

from .data import DistillDataset
from .metrics import average_precision, mean_and_stderr, ranking, recall_at, spearman
from .train import item_features, query_features

FRACTIONS = (0.0042, 0.0085, 0.034)
MOTIF_PROMPT = "a large red circle in the center on a plain white background with a {motif}"  # teacher_checks.py
MOTIF_TOP = 30


def method_scores(data: DistillDataset, tuned: Encoder, baseline: Encoder, cache: str | Path | None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """{method: [test queries, N] scores, higher = more influential}. The untuned methods use the
    baseline's backbone features, the tuned encoder its own (the same when they share backbones)."""
    trained = Path(tuned.base_dir) / "train.json"
    if trained.is_file():
        manifest = json.loads(trained.read_text()).get("manifest")
        if manifest and manifest != data.meta.get("fingerprints", {}).get("manifest"):
            raise FastattrError(f"{trained}: this head was distilled for another training manifest than "
                                f"{data.path}'s; evaluate it on a dataset of its own model")
    test = data.queries("test")
    if not len(test):
        raise FastattrError(f"{data.path}: no test query; the evaluation needs test queries scored against the "
                            f"whole training set")
    fi, fq = np.asarray(item_features(baseline, data, cache)), np.asarray(query_features(baseline, data, cache))[test]
    methods = {"random": np.random.default_rng(seed).random((len(test), len(fi)))}
    start = 0
    for b in baseline.backbones:
        part = slice(start, start + b.dim)
        methods[f"untuned {b.spec.kind}"] = _unit(fq[:, part]) @ _unit(fi[:, part]).T
        start += b.dim
    methods["untuned concatenation"] = baseline.embed_features(fq, "query") @ baseline.embed_features(fi).T
    if tuned.backbone_fingerprint != baseline.backbone_fingerprint:
        fi, fq = np.asarray(item_features(tuned, data, cache)), np.asarray(query_features(tuned, data, cache))[test]
    methods[f"tuned ({tuned.spec.name})"] = tuned.embed_features(fq, "query") @ tuned.embed_features(fi).T
    for v, name in enumerate(data.variants):
        methods[f"teacher variant '{name}'"] = np.stack([full_scores(data, q, data.variant_tau[v]) for q in test])
    # judged against another seed (``with_reference``), the runs a student's labels average are one more teacher
    averaged = [n for n in ("main run", *data.meta.get("job", {}).get("train_variants", [])) if n in data.variants]
    if len(averaged) > 1:
        methods[f"teacher mean of {' + '.join(averaged)}"] = np.mean(
            [methods[f"teacher variant '{n}'"] for n in averaged], axis=0)
    return methods


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def full_scores(data: DistillDataset, q: int, tau: np.ndarray) -> np.ndarray:
    """A test query's scores in training-table order."""
    out = np.full(len(data.train_keys), -np.inf)
    out[data.item_rows(data.key[data.candidates(q)])] = tau[data.candidates(q)]
    return out


def evaluate(data: DistillDataset, methods: dict[str, np.ndarray], reference: str = "main run") -> dict:
    """Metrics of every method against the teacher's ranking of each test query (``data.tau``: the
    ``reference`` run, see ``DistillDataset.with_reference``)."""
    teacher = np.stack([full_scores(data, q, data.tau) for q in data.queries("test")])
    n = teacher.shape[1]
    counts = {f"{100 * f:.2f}%": max(1, round(f * n)) for f in FRACTIONS}
    report = {"dataset": str(data.path.name), "training_items": n, "test_queries": len(teacher),
              "reference": reference, "L": counts, "methods": {}}
    for name, scores in methods.items():
        row = {}
        for label, count in counts.items():
            row[f"mAP@{label}"] = mean_and_stderr([average_precision(t, s, count) for t, s in zip(teacher, scores)])
            row[f"recall@{label}"] = mean_and_stderr([recall_at(t, s, count) for t, s in zip(teacher, scores)])
        row["spearman"] = mean_and_stderr([spearman(t, s) for t, s in zip(teacher, scores)])
        report["methods"][name] = {k: [round(v[0], 4), round(v[1], 4)] for k, v in row.items()}
    carriers = motif_carriers(data)
    asking = motif_queries(data, carriers)
    if asking:
        rows = [j for j, _ in asking]
        found = {f"teacher ({reference})": teacher[rows], **{name: scores[rows] for name, scores in methods.items()}}
        per_query = {name: [int(np.sum(carriers[ranking(s)[:MOTIF_TOP]] == m)) for s, (_, m) in zip(scores, asking)]
                     for name, scores in found.items()}
        report["motif_queries"] = {
            "top": MOTIF_TOP, "queries": len(asking), "carriers": int(sum(np.sum(carriers == m) for _, m in asking)),
            "found": {name: sum(counts) for name, counts in per_query.items()}, "per_query": per_query}
    return report


def motif_carriers(data: DistillDataset) -> np.ndarray:
    """[N] the rare motif each training item carries (the manifest's ``attributes.motif``; the sandbox
    world has 4, each on 6 images), else None."""
    motif_of = {}
    with open(data.manifest, encoding="utf-8") as manifest:
        for line in manifest:
            row = json.loads(line)
            motif_of[str(row["id"])] = (row.get("attributes") or {}).get("motif")
    return np.array([motif_of.get(str(i)) for i in data.train_ids], dtype=object)


def motif_queries(data: DistillDataset, carriers: np.ndarray, split: str = "test") -> list[tuple[int, str]]:
    """(position among the split's queries, motif) of every query whose prompt names a rare motif
    (one of ``carriers``, from ``motif_carriers``)."""
    motifs = sorted({m for m in carriers if m})
    named = [(j, next((m for m in motifs if m in str(data.prompt[q])), None))
             for j, q in enumerate(data.queries(split))]
    return [(j, m) for j, m in named if m]


def motif_check(encoders: dict[str, Encoder], sandbox: str | Path | None, data: DistillDataset,
                cache: str | Path | None) -> dict:
    """The teacher figures' rare-motif check for embeddings: for an image generated from a prompt
    asking for a motif (seed 0), how many of that motif's training images are in the top 30."""
    from fastattr_sandbox import build
    from fastattr_sandbox.world import MOTIFS

    root = build.sandbox_dir(sandbox)
    carriers = motif_carriers(data)
    prompts = [MOTIF_PROMPT.format(motif=m) for m in MOTIFS]
    pipe = build.load_pipeline(root)
    images = [build.generate([p], root=root, seed=0, pipe=pipe)[0] for p in prompts]
    out = {"top": MOTIF_TOP, "carriers": int(sum(c is not None for c in carriers)), "methods": {}}
    for name, encoder in encoders.items():
        items = encoder.embed_features(np.asarray(item_features(encoder, data, cache)))
        queries = encoder.embed(images, prompts, role="query")
        found = [int(np.sum(carriers[ranking(items @ q)[:MOTIF_TOP]] == m)) for q, m in zip(queries, MOTIFS)]
        out["methods"][name] = {"found": sum(found), "per_motif": dict(zip(MOTIFS, found))}
    return out


def write_report(report: dict, out: str | Path, command: str) -> list[Path]:
    """``OUT.json``, ``OUT.md`` (table + the command) and ``OUT.png`` (mAP chart)."""
    out = Path(out)
    labels = list(report["L"])
    lines = [f"# Distilled encoder vs the teacher ({report['dataset']})", "",
             f"Command: `{command}`", "",
             f"{report['test_queries']} test queries, each ranked by the teacher against all "
             f"{report['training_items']} training items (teacher run: {report['reference']}); "
             f"the teacher's top L are the positives "
             f"(L = {', '.join(f'{k} = {v}' for k, v in report['L'].items())}). Mean +- standard error.", "",
             "| method | " + " | ".join(f"mAP({k})" for k in labels) + " | Spearman | " +
             " | ".join(f"recall@{k}" for k in labels) + " |",
             "|---" * (2 * len(labels) + 2) + "|"]
    for name, row in report["methods"].items():
        cells = [f"{row[f'mAP@{k}'][0]:.3f} +- {row[f'mAP@{k}'][1]:.3f}" for k in labels]
        cells += [f"{row['spearman'][0]:.3f}"] + [f"{row[f'recall@{k}'][0]:.3f}" for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "motifs" in report:
        m = report["motifs"]
        lines += ["", f"Rare motifs: of the {m['carriers']} training images that carry one of the 4 motifs, how many "
                  f"an image generated for a prompt asking for that motif puts in its top {m['top']}:", ""]
        lines += [f"- {name}: {r['found']} of {m['carriers']} ({r['per_motif']})" for name, r in m["methods"].items()]
    if "motif_queries" in report:
        m = report["motif_queries"]
        lines += ["", f"Rare motifs on the {m['queries']} test queries whose prompt asks for one: of the "
                  f"{m['carriers']} training images that carry the asked motif, how many each ranking puts in its "
                  f"top {m['top']} (chance {m['carriers'] * m['top'] / report['training_items']:.2f}):", ""]
        for name, found in m["found"].items():
            mean, stderr = mean_and_stderr(m["per_query"][name])
            lines.append(f"- {name}: {found} of {m['carriers']} ({mean:.2f} +- {stderr:.2f} a query)")
    atomic_write_text(out.with_suffix(".json"), json.dumps({**report, "command": command}, indent=1))
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    _chart(report, out.with_suffix(".png"))
    return [out.with_suffix(s) for s in (".json", ".md", ".png")]


def _chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, names = list(report["L"]), list(report["methods"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [report["methods"][name][f"mAP@{k}"][0] for k in labels]
        errors = [report["methods"][name][f"mAP@{k}"][1] for k in labels]
        ax.bar(np.arange(len(labels)) + i * width, means, width, yerr=errors, label=name, capsize=2)
    ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"L = {k} of N ({report['L'][k]})" for k in labels])
    ax.set_ylabel("mAP against the teacher")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['test_queries']} test queries, {report['training_items']} training items")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
