"""AbU+'s EK-FAC preconditioner: the inverse against a dense solve, the eigenvalue correction's
defining properties, hooks that see each sample's own gradient, and the teacher on the micro sandbox."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastattr_hook.errors import FastattrError
from fastattr_teacher import (EKFAC, FisherDiagonal, TeacherConfig, UNetAdapter, capture_linear_io,
                              compute_fisher_diagonal, compute_preconditioner, factor_sums, kronecker_bases,
                              linear_layers, load_preconditioner, load_teacher_config, per_sample_grads,
                              query_gradient, read_training_items, rotated_squares, score_query)

# The small config of test_teacher.py, with the EK-FAC Fisher.
CONFIG = TeacherConfig(fisher_samples=160, query_pairs=128, timesteps=4, batch_size=32, preconditioner="ekfac")


def _tiny_captures(seed: int = 0):
    """A 5 -> 4 Linear, 12 samples of 3 tokens, per-sample MSE: (layer, inputs, targets, captures)."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(5, 4, bias=False).double()
    x, y = torch.randn(12, 3, 5, generator=gen, dtype=torch.float64), torch.randn(12, 3, 4, generator=gen,
                                                                                   dtype=torch.float64)
    captures = capture_linear_io({"weight": layer}, lambda: (layer(x) - y).pow(2).flatten(1).mean(1))
    return layer, x, y, captures


def test_hooks_capture_each_samples_own_gradient():
    layer, x, y, captures = _tiny_captures()
    a, g = captures["weight"]
    assert a.shape == (12, 3, 5) and g.shape == (12, 3, 4) and a.dtype == torch.float64

    def loss(params, xi, yi):
        return (torch.func.functional_call(layer, params, (xi,)) - yi).pow(2).mean()

    expected = per_sample_grads(loss, {"weight": layer.weight.detach()}, x, y)["weight"]
    torch.testing.assert_close(torch.einsum("bto,bti->boi", g, a), expected, rtol=1e-12, atol=1e-14)
    square = torch.nn.Linear(4, 4)
    with pytest.raises(FastattrError, match="ran twice"):
        capture_linear_io({"weight": square}, lambda: square(square(torch.randn(2, 4))).sum(1))


def test_inverse_apply_equals_a_dense_solve_of_the_ekfac_matrix():
    _, _, _, captures = _tiny_captures()
    bases = kronecker_bases(factor_sums(captures))
    lam = rotated_squares(captures, bases)["weight"] / 12
    q_out, q_in = bases["weight"]
    fisher = EKFAC({"weight": q_out}, {"weight": q_in}, {"weight": lam}, num_train=12)
    # Row-major vec(Q_G R Q_A^T) = (Q_G kron Q_A) vec(R): the dense EK-FAC matrix plus relative damping.
    basis, damping = torch.kron(q_out, q_in), 0.1
    dense = basis @ torch.diag(lam.flatten()) @ basis.T + damping * lam.mean() * torch.eye(20, dtype=torch.float64)
    grad = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solved = torch.linalg.solve(dense, grad.flatten()).view(4, 5)
    torch.testing.assert_close(fisher.inverse_apply({"weight": grad}, damping)["weight"], solved,
                               rtol=1e-10, atol=0)
    # Lambda is the empirical Fisher's exact diagonal in the Kronecker eigenbasis.
    a, g = captures["weight"]
    dw = torch.einsum("bto,bti->boi", g, a).flatten(1)
    empirical = dw.T @ dw / len(dw)
    torch.testing.assert_close(torch.diagonal(basis.T @ empirical @ basis), lam.flatten(), rtol=1e-10, atol=1e-14)


def test_corrected_eigenvalues_are_the_kfac_products_on_kronecker_data():
    # Every pair (a_k, g_m) once, one token per sample: the Fisher is exactly A kron G, so the
    # correction must return the K-FAC eigenvalue products.
    gen = torch.Generator().manual_seed(2)
    a_k, g_m = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen,
                                                                                   dtype=torch.float64)
    a, g = a_k.repeat(7, 1)[:, None], g_m.repeat_interleave(6, 0)[:, None]
    captures = {"w": (a, g)}
    bases = kronecker_bases(factor_sums(captures))
    q_out, q_in = bases["w"]
    eig_g = torch.diagonal(q_out.T @ (g_m.T @ g_m / 7) @ q_out)
    eig_a = torch.diagonal(q_in.T @ (a_k.T @ a_k / 6) @ q_in)
    torch.testing.assert_close(rotated_squares(captures, bases)["w"] / 42, torch.outer(eig_g, eig_a),
                               rtol=1e-10, atol=1e-14)
    # Summing the batches' shares gives the same answer as one batch.
    halves = [{"w": (a[:21], g[:21])}, {"w": (a[21:], g[21:])}]
    factors = [factor_sums(half) for half in halves]
    bases = kronecker_bases({key: factors[0][key] + factors[1][key] for key in factors[0]})
    squares = sum(rotated_squares(half, bases)["w"] for half in halves)
    torch.testing.assert_close(squares / 42, torch.outer(eig_g, eig_a), rtol=1e-10, atol=1e-14)


def test_preconditioner_in_teacher_config(tmp_path):
    path = tmp_path / "teacher.yaml"
    path.write_text("preconditioner: ekfac\n")
    assert load_teacher_config(path).preconditioner == "ekfac"
    assert TeacherConfig().preconditioner == "diagonal"
    path.write_text("preconditioner: kfac\n")
    with pytest.raises(FastattrError, match="preconditioner"):
        load_teacher_config(path)


@pytest.fixture(scope="module")
def sandbox_ekfac(micro_sandbox):
    from fastattr_sandbox import build

    torch.set_num_threads(1)
    adapter = UNetAdapter(build.load_pipeline(micro_sandbox, check=False))
    items = read_training_items(micro_sandbox / "data" / "manifest.jsonl")
    return adapter, items, compute_preconditioner(adapter, items, CONFIG)


def test_ekfac_round_trip_and_same_draws_as_the_diagonal(sandbox_ekfac, tmp_path):
    adapter, items, fisher = sandbox_ekfac
    assert isinstance(fisher, EKFAC) and fisher.num_train == len(items)
    fisher.save(tmp_path / "ekfac.safetensors")
    loaded = load_preconditioner(tmp_path / "ekfac.safetensors")
    assert isinstance(loaded, EKFAC) and loaded.num_train == fisher.num_train
    assert loaded.meta["kind"] == "ekfac" and loaded.meta["config"]["preconditioner"] == "ekfac"
    for part in ("basis_out", "basis_in", "eigenvalues"):
        assert all(torch.equal(getattr(loaded, part)[n], getattr(fisher, part)[n]) for n in fisher.eigenvalues)
    # A rotation keeps |dW|^2, so each layer's eigenvalues sum to its diagonal Fisher's trace when
    # both saw the same draws and the hooks saw each sample's own gradient.
    diagonal = compute_fisher_diagonal(adapter, items, CONFIG)
    for name, lam in fisher.eigenvalues.items():
        torch.testing.assert_close(lam.double().sum(), diagonal.diagonal[name].double().sum(), rtol=1e-5, atol=0)
    diagonal.save(tmp_path / "diagonal.safetensors")
    assert isinstance(load_preconditioner(tmp_path / "diagonal.safetensors"), FisherDiagonal)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FastattrError, match="not a Fisher file"):
        load_preconditioner(tmp_path / "junk.safetensors")

    latents, text = adapter.encode_item(items[0])
    grads = query_gradient(adapter, latents, text, CONFIG)
    out = loaded.inverse_apply(grads, CONFIG.damping)
    assert out.keys() == grads.keys()
    assert all(out[n].shape == grads[n].shape and torch.isfinite(out[n]).all() for n in out)


@pytest.mark.slow  # the README command stays under 5 minutes; .ci/run runs the slow lane after it
def test_ekfac_self_attribution(sandbox_ekfac):
    adapter, items, fisher = sandbox_ekfac
    q = 68
    rank = score_query(adapter, fisher, items, items[q].load_image(), items[q].caption, CONFIG).rank_of(items[q].id)
    print(f"EK-FAC self-attribution rank of item {q} (0-based, of {len(items)}): {rank}")
    # Measured with this config over 8 evenly spaced queries (0, 23, ..., 159): EK-FAC ranked every
    # query's own image 0 of 160; the diagonal Fisher ranked them [1, 0, 1, 47, 33, 0, 11, 1] (47 for this one).
    assert rank < 0.1 * len(items), rank


def test_ekfac_rejects_parameters_that_are_not_linear_weights(sandbox_ekfac):
    adapter, items, fisher = sandbox_ekfac
    with pytest.raises(FastattrError, match=r"'conv_in\.weight' is not one.*preconditioner: diagonal"):
        compute_preconditioner(adapter, items, TeacherConfig(params="all", preconditioner="ekfac"))
    with pytest.raises(FastattrError, match=r"attn2\.to_out\.0\.bias' is not one"):
        compute_preconditioner(adapter, items, TeacherConfig(params="cross_attn", preconditioner="ekfac"))
    assert list(linear_layers(adapter.unet, fisher.eigenvalues)) == list(fisher.eigenvalues)


@pytest.mark.parametrize("preconditioner, killed_at_write, batches_redone",
                         [("diagonal", 3, 2), ("ekfac", 6, 3)])  # ekfac: pass 1 done (4 writes), 1 of pass 2
def test_fisher_pass_killed_and_resumed_gives_the_same_bits(sandbox_ekfac, tmp_path, monkeypatch,
                                                             preconditioner, killed_at_write, batches_redone):
    import fastattr_teacher.fisher as fisher_mod

    adapter, items, _ = sandbox_ekfac
    config = TeacherConfig(fisher_samples=64, batch_size=16, preconditioner=preconditioner)  # 4 batches a pass
    expected = compute_preconditioner(adapter, items, config)
    monkeypatch.setattr(fisher_mod, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every batch
    writes, write = [], fisher_mod.atomic_write_bytes

    def killed(path, data):
        writes.append(path)
        if len(writes) == killed_at_write:
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(fisher_mod, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        compute_preconditioner(adapter, items, config, tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(fisher_mod, "CHECKPOINT_SECONDS", 0.0)
    encoded = []
    monkeypatch.setattr(adapter, "encode_item", lambda item, *a: encoded.append(item) or type(adapter).encode_item(
        adapter, item, *a))
    resumed = compute_preconditioner(adapter, items, config, tmp_path)
    assert len(encoded) == batches_redone * 16  # the saved batches are not redone
    parts = ("diagonal",) if preconditioner == "diagonal" else ("basis_out", "basis_in", "eigenvalues")
    for part in parts:
        got, want = getattr(resumed, part), getattr(expected, part)
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), part
    # A checkpoint made with other settings is not resumed: the pass starts over.
    passes = 1 if preconditioner == "diagonal" else 2
    encoded.clear()
    compute_preconditioner(adapter, items, dataclasses.replace(config, seed=1), tmp_path)
    assert len(encoded) == 64 * passes
    encoded.clear()  # nor is one made for other captions (they steer the draws)
    recaptioned = [dataclasses.replace(items[0], more_captions=("another caption",)), *items[1:]]
    compute_preconditioner(adapter, recaptioned, dataclasses.replace(config, seed=1), tmp_path)
    assert len(encoded) == 64 * passes
